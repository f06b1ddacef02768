"""Data-parallel training (batchlab.distributed.ddp): two gloo ranks on CPU must take the same
steps as one process on the global batch, BatchNorm statistics included (SyncBatchNorm)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from batchlab.distributed import DistEnv, dist_env, fit_ddp, shard_bounds
from batchlab.tasks import get_task
from batchlab.train import TrainConfig, fit

WORLD = 2
TOL = 1e-6


def _model(task: Any, cfg: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return task.make_model(norm=cfg.norm, activation=cfg.activation)


def _worker(rank: int, world: int, init_file: str, out: str, cfg_dict: dict[str, Any], kwargs: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        task = get_task("digits-mlp")
        cfg = TrainConfig.from_dict(cfg_dict)
        model = _model(task, cfg)
        result = fit_ddp(task, cfg, model=model, env=DistEnv(rank, world, rank), **kwargs)
        torch.save({"state": model.state_dict(), "result": result.to_dict()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # skip the C++ destructors at interpreter exit, where gloo's threads can abort a finished process
    # (SIGABRT after the result was saved, seen once in a fresh-clone CI run)
    os._exit(0)


def _run_ddp(tmp_path: Path, cfg: TrainConfig, **kwargs: Any) -> list[dict[str, Any]]:
    init = tmp_path / "init"
    mp.spawn(_worker, args=(WORLD, str(init), str(tmp_path), cfg.to_dict(), kwargs), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys(), f"state keys differ: {sorted(set(a) ^ set(b))}"
    worst, where = 0.0, ""
    for k in a:
        d = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        if d > worst:
            worst, where = d, k
    return worst, where


@pytest.mark.parametrize(
    "case",
    [
        # BN model, accumulation 2, fixed LR: the step-for-step parity the design promises
        dict(norm="batch", batch_size=16, accumulation=2, max_steps=6, lr=0.05, optimizer="momentum"),
        # odd budget: the last global batch (29 examples) splits 15/14 across the ranks; grad clipping
        dict(norm="batch", batch_size=64, max_examples=1437, lr=0.05, optimizer="momentum", grad_clip=0.5),
        # no normalization, Adam
        dict(norm="none", batch_size=32, max_steps=4, lr=1e-3, optimizer="adam"),
    ],
    ids=["bn-accum", "bn-uneven-clip", "nonorm-adam"],
)
def test_two_ranks_match_one_process_on_global_batch(tmp_path: Path, case: dict[str, Any]) -> None:
    cfg = TrainConfig(eval_every=2, **case)
    ranks = _run_ddp(tmp_path, cfg, lr_rule="none")
    task = get_task("digits-mlp")
    single_cfg = cfg.replace(batch_size=cfg.batch_size * WORLD)
    model = _model(task, single_cfg)
    single = fit(task, single_cfg, model=model)
    ref = model.state_dict()
    for r, out in enumerate(ranks):
        diff, where = _max_diff(out["state"], ref)
        assert diff <= TOL, f"rank {r}: parameters/buffers differ from one process by {diff:.3g} at {where}"
        res = out["result"]
        assert res["steps"] == single.steps and res["examples"] == single.examples
        for row, srow in zip(res["history"], single.history, strict=True):
            for key in ("batch_loss", "val_loss", "val_acc", "train_loss"):
                if math.isnan(srow[key]):
                    assert math.isnan(row[key]), f"rank {r} step {row['step']}: {key} {row[key]} vs nan"
                    continue
                assert abs(row[key] - srow[key]) <= 1e-5, f"rank {r} step {row['step']}: {key} {row[key]} vs {srow[key]}"
    d = ranks[0]["result"]["extra"]["distributed"]
    assert d["world_size"] == WORLD and d["global_batch"] == cfg.batch_size * WORLD * cfg.accumulation
    assert d["sync_bn_layers"] == (3 if cfg.norm == "batch" else 0)
    assert d["gradient_syncs"] == single.steps
    assert ranks[0]["result"]["config"] == cfg.to_dict()  # the per-rank config is what is reported


def test_noise_scale_from_rank_gradients(tmp_path: Path) -> None:
    """B_simple is updated every step from per-rank norms; it must equal the estimate computed from
    the same two batch sizes by one process (micro-batches of the same examples via accumulation)."""
    cfg = TrainConfig(norm="none", batch_size=32, max_steps=5, lr=0.05, optimizer="sgd", eval_every=1)
    ranks = _run_ddp(tmp_path, cfg, lr_rule="none", gns_beta=0.5)
    state = ranks[0]["result"]["extra"]["distributed"]["noise_scale"]
    assert state["updates"] == 5
    logged = [row["b_simple"] for row in ranks[0]["result"]["history"] if "b_simple" in row]
    assert len(logged) == 5 and logged[-1] == pytest.approx(state["b_simple"])

    # One process, accumulation 2 of 32 = the same two shards per step (same permutation, same
    # order), so the micro-batch estimator of batchsize.noise must give the same numbers.
    from batchlab.batchsize.noise import GradientNoiseScale

    gns = GradientNoiseScale(beta=0.5, small="all")  # every micro-batch, like every rank
    task = get_task("digits-mlp")
    fit(task, cfg.replace(accumulation=2, batch_size=32), model=_model(task, cfg), callbacks=[gns])
    ref = [p.b_simple for p in gns.history]
    got = [p["b_simple"] for p in state["history"]]
    assert got == pytest.approx(ref, rel=1e-4), f"DDP B_simple {got} vs accumulation B_simple {ref}"


def test_lr_is_scaled_to_the_global_batch(tmp_path: Path) -> None:
    cfg = TrainConfig(norm="none", batch_size=16, max_steps=1, lr=0.1, optimizer="momentum", eval_train=False)
    ranks = _run_ddp(tmp_path, cfg, lr_rule="linear", gns=False)
    d = ranks[0]["result"]["extra"]["distributed"]
    assert d["lr"] == pytest.approx(0.2) and d["lr_rule"] == "linear" and d["noise_scale"] is None
    assert ranks[0]["result"]["history"][-1]["lr"] == pytest.approx(0.2)


def test_shard_bounds_cover_the_batch() -> None:
    for n in range(0, 20):
        for world in (1, 2, 3, 4):
            parts = [shard_bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(h - l for l, h in parts) - min(h - l for l, h in parts) <= 1
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        shard_bounds(4, 2, 2)


def test_dist_env() -> None:
    assert dist_env({}) is None
    assert dist_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistEnv(1, 4, 1)
    with pytest.raises(ValueError, match="RANK=5 WORLD_SIZE=4"):
        dist_env({"RANK": "5", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="must be integers"):
        dist_env({"RANK": "x", "WORLD_SIZE": "4"})


def test_fit_ddp_needs_an_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="torchrun environment"):
        fit_ddp("digits-mlp", TrainConfig(max_steps=1))
    with pytest.raises(ValueError, match="lbfgs"):
        fit_ddp("digits-mlp", TrainConfig(max_steps=1, optimizer="lbfgs"))
    with pytest.raises(ValueError, match="lr_rule must be one of"):
        fit_ddp("digits-mlp", TrainConfig(max_steps=1), lr_rule="cubic")


# ------------------------------------------------------------------------------------ torchrun

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def _torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(WORLD), *args]  # standalone: a free local port
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_torchrun_maybe_run_distributed(tmp_path: Path) -> None:
    """The CLI path under a real torchrun (env:// rendezvous): only rank 0 returns a result."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import argparse, json, sys
        from batchlab.distributed import maybe_run_distributed
        from batchlab.tasks import get_task
        from batchlab.train import TrainConfig
        args = argparse.Namespace(lr_rule="none", quiet=True)
        result = maybe_run_distributed(args, get_task("digits-mlp"), TrainConfig(batch_size=16, max_steps=3, lr=0.05))
        print("RESULT " + json.dumps({"steps": result.steps, "extra": result.extra["distributed"]}))
    """))
    t0 = time.perf_counter()
    proc = _torchrun([str(script)], tmp_path)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one result (rank 0 only), got {len(lines)}:\n{proc.stdout}"
    got = json.loads(lines[0][len("RESULT "):])
    assert got["steps"] == 3 and got["extra"]["world_size"] == WORLD and got["extra"]["global_batch"] == 32
    print(f"torchrun 2 ranks, 3 steps: {elapsed:.1f} s")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_torchrun_cli_train(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _torchrun(
        ["-m", "batchlab.cli", "train", "--task", "digits-mlp", "--steps", "3", "--batch-size", "16",
         "--lr", "0.05", "--quiet", "--out", str(out)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, f"rank 0 alone writes one result, found {files}"
    res = json.loads(files[0].read_text())
    assert res["steps"] == 3 and res["extra"]["distributed"]["world_size"] == WORLD
    assert res["extra"]["distributed"]["sync_bn_layers"] == 3

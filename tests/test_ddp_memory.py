"""The memory finder under ``torchrun --nproc_per_node 2`` (gloo, CPU): ranks with different memory
agree on every trial and return the same batch; a rank that fails never leaves the other waiting.
The same through Lightning's DDP strategy: BatchSizeTuner and the noise-scale callback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
TESTS = Path(__file__).resolve().parent

SCRIPT = r'''
import datetime, json, os, sys
import torch
import torch.distributed as dist
import torch.nn as nn

torch.set_num_threads(1)
sys.path.insert(0, TESTS)
from conftest import make_toy_task
from batchlab.batchsize import max_batch_size
import batchlab.batchsize.memory as memory

# the limits below come from a first measurement: the search runs on the deterministic accounted bytes
# (the resident-peak reading, which varies from run to run, has its own test)
memory.peak_rss_over = lambda fn: (fn(), None)

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()


class FakeOOM(nn.Module):
    def __init__(self, inner, threshold, error=RuntimeError):
        super().__init__()
        self.inner, self.threshold, self.error = inner, threshold, error

    def forward(self, x):
        if x.shape[0] > self.threshold:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB" if self.error is RuntimeError
                             else "shape mismatch (not an OOM)")
        return self.inner(x)


task = make_toy_task(n_train=256)
out = {"rank": rank}
# 1. less memory on rank 1: a limit with room for ~200 examples on rank 0, ~40 on rank 1
free = max_batch_size(task, memory_limit=2**40, margin=0.0, distributed=False)
ddp = sum(p.numel() * p.element_size() for p in task.make_model().parameters())  # DDP's gradient buckets
limit = int(free.fixed_bytes + ddp + free.per_sample_bytes * (200 if rank == 0 else 40))
alone = max_batch_size(task, memory_limit=limit, margin=0.0, distributed=False)
agreed = max_batch_size(task, memory_limit=limit, margin=0.0)
out["alone"], out["agreed"], out["world"] = alone.batch_size, agreed.batch_size, agreed.world_size
out["tried"] = [[b, ok] for b, ok, _ in agreed.tried]
# 2. a (fake) OOM above 48 examples on rank 1 only
r = max_batch_size(task, model=FakeOOM(task.make_model(), 10**6 if rank == 0 else 48), memory_limit=2**40)
out["fake_oom"] = r.batch_size
out["fake_tried"] = [[b, ok] for b, ok, _ in r.tried]
# 3. another error on rank 1 only: each rank raises, none waits for the other
try:
    max_batch_size(task, model=FakeOOM(task.make_model(), 10**6 if rank == 0 else 48, ValueError), memory_limit=2**40)
    out["error"] = None
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
os.write(1, ("RESULT " + json.dumps(out) + "\n").encode())  # one write: the ranks' lines never interleave
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # skip the C++ destructors at interpreter exit, where gloo's threads can abort a finished process
'''


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_ranks_agree_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "find.py"
    script.write_text(f"TESTS = {str(TESTS)!r}\n" + textwrap.dedent(SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script)]
    # a hang (a rank waiting in a collective the other never reaches) fails here instead of blocking CI
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = sorted((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                  key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1], proc.stdout
    r0, r1 = rows
    # alone, the ranks would disagree; agreed, both take the smaller rank's answer (at most each rank's share, 128)
    assert (r0["alone"], r1["alone"]) == (128, 32)
    assert r0["agreed"] == r1["agreed"] == 32 and r0["world"] == r1["world"] == 2
    assert r0["tried"] == r1["tried"]  # the same trials, with the same agreed outcomes, on both ranks
    # one rank's OOM fails the trial everywhere
    assert r0["fake_oom"] == r1["fake_oom"] == 32
    assert r0["fake_tried"] == r1["fake_tried"] and [b for b, ok in r0["fake_tried"] if not ok] == [128, 64]
    # a non-OOM error on rank 1: rank 1 raises it, rank 0 is told and raises too (no hang)
    assert r1["error"].startswith("ValueError: shape mismatch")
    assert r0["error"].startswith("RuntimeError: max_batch_size: another rank failed at batch")


LIGHTNING_SCRIPT = r"""
import json, os
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from batchlab.integrations.lightning import BatchSizeTuner, GradientNoiseScaleCallback

torch.set_num_threads(1)
rank = int(os.environ["RANK"])


class Tiny(pl.LightningModule):
    def __init__(self, lr=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DM(pl.LightningDataModule):
    def __init__(self, batch_size=4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 5, generator=g)
        self.data, self.batch_size = TensorDataset(x, (x[:, 0] > 0).long()), batch_size

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


# rank 1 has room for about 40 examples of this model's step (accounted bytes), rank 0 for everything
tuner = BatchSizeTuner(memory_limit=10**9 if rank == 0 else 6600)
gns = GradientNoiseScaleCallback(beta=0.5)
dm = DM()
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[tuner, gns])
trainer.fit(Tiny(), datamodule=dm)
m = tuner.result["measured"]
os.write(1, ("RESULT " + json.dumps({
    "rank": rank, "batch": tuner.result["batch_size"], "dm": dm.batch_size, "lr": tuner.result["lr"],
    "world": m["world_size"], "n": m["n_examples"], "tried": [[b, ok] for b, ok, _ in m["tried"]],
    "over": [b for b, ok, used in m["tried"] if used > m["budget_bytes"]], "modes": gns.modes,
    "history": [[p.g2, p.tr_sigma] for p in gns.tracker.history]}) + "\n").encode())
# Lightning leaves its process group up; tear it down in step on both ranks and skip the C++
# destructors at interpreter exit, where gloo's threads can abort a finished process
import torch.distributed as dist
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_lightning_ddp_tuner_and_noise_scale(tmp_path: Path) -> None:
    pytest.importorskip("lightning", reason="the 'lightning' extra is not installed")
    script = tmp_path / "fit.py"
    script.write_text(LIGHTNING_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = sorted((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                  key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1], proc.stdout
    r0, r1 = rows
    # BatchSizeTuner under DDP (Lightning's BatchSizeFinder refuses it): one answer, the tighter rank's
    assert r0["world"] == r1["world"] == 2 and r0["n"] == r1["n"] == 128  # each rank's share of 256 examples
    assert r0["batch"] == r1["batch"] == r0["dm"] == r1["dm"] and r0["batch"] < 128
    assert r0["tried"] == r1["tried"] and r0["over"] == [] and r1["over"]  # rank 1's budget decided
    assert r0["lr"] == r1["lr"] == pytest.approx(0.1 * r0["batch"] / 4)
    # the noise scale from per-rank split batches, averaged over ranks: the same on both
    assert r0["modes"] == r1["modes"] == {"accumulation": 0, "split": 3}
    assert r0["history"] == r1["history"] and len(r0["history"]) == 3

"""The memory finder under ``torchrun --nproc_per_node 2`` (gloo, CPU): ranks with different memory
agree on every trial and return the same batch; a rank that fails never leaves the other waiting."""

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
import datetime, json, sys
import torch
import torch.distributed as dist
import torch.nn as nn

torch.set_num_threads(1)
sys.path.insert(0, TESTS)
from conftest import make_toy_task
from batchlab.batchsize import max_batch_size

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
print("RESULT " + json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
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
    # alone, the ranks would disagree; agreed, both take the smaller rank's answer
    assert (r0["alone"], r1["alone"]) == (128, 32)
    assert r0["agreed"] == r1["agreed"] == 32 and r0["world"] == r1["world"] == 2
    assert r0["tried"] == r1["tried"]  # the same trials, with the same agreed outcomes, on both ranks
    # one rank's OOM fails the trial everywhere
    assert r0["fake_oom"] == r1["fake_oom"] == 32
    assert r0["fake_tried"] == r1["fake_tried"] and [b for b, ok in r0["fake_tried"] if not ok] == [256, 64]
    # a non-OOM error on rank 1: rank 1 raises it, rank 0 is told and raises too (no hang)
    assert r1["error"].startswith("ValueError: shape mismatch")
    assert r0["error"].startswith("RuntimeError: max_batch_size: another rank failed at batch")

"""Subprocess side of tests/test_store.py (run as a script, not collected by pytest).

Modes:
  sweep DB LOG N SLEEP   run N trials through Store.run_or_load; each execution appends its key
                         to LOG (flushed and fsynced) before it sleeps SLEEP seconds.
  write DB OUT NAME N SHARED
                         wait for DB.go to exist, then put N keys of its own (prefix NAME) and run
                         run_or_load on SHARED keys shared with the other writer; write to OUT the
                         payload it got back for every shared key (JSON).
  key                    print run_key of a fixed task and config (checked across hash seeds).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from batchlab.store import Store, run_key


def trial_key(i: int) -> str:
    return run_key({"task": "sleepy", "n": 30}, {"trial": i, "lr": 0.1 * (i + 1), "seed": 0})


def trial_payload(i: int) -> dict:
    return {"status": "ok", "trial": i, "value": i * i, "lr": 0.1 * (i + 1)}


def sweep(db: str, log: str, n: int, sleep: float) -> None:
    store = Store(db, timeout=30)
    for i in range(n):
        key = trial_key(i)

        def run(i: int = i, key: str = key) -> dict:
            with open(log, "a") as f:
                f.write(key + "\n")
                f.flush()
                os.fsync(f.fileno())
            if sleep:
                time.sleep(sleep)
            return trial_payload(i)

        store.run_or_load(key, run, kind="sweep")


def write(db: str, out: str, name: str, n: int, shared: int) -> None:
    store = Store(db, timeout=30)
    go = Path(db + ".go")
    deadline = time.time() + 30
    while not go.exists() and time.time() < deadline:
        time.sleep(0.005)
    got = {}
    for i in range(max(n, shared)):
        if i < n:
            store.put(f"{name}-{i}", {"status": "ok", "writer": name, "i": i}, kind=name)
        if i < shared:
            key = f"shared-{i}"
            got[key] = store.run_or_load(key, lambda i=i: {"status": "ok", "writer": name, "i": i}, kind="shared")
    Path(out).write_text(json.dumps(got))


def key() -> None:
    cfg = {"batch_size": 64, "lr": 0.1, "milestones": (0.5, 0.75), "seed": 3, "norm": None, "amp": False}
    print(run_key({"name": "digits-mlp", "n_train": 1437, "classes": list(range(10))}, cfg, experiment="e1"))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "sweep":
        sweep(args[0], args[1], int(args[2]), float(args[3]))
    elif mode == "write":
        write(args[0], args[1], args[2], int(args[3]), int(args[4]))
    elif mode == "key":
        key()
    else:
        raise SystemExit(f"unknown mode {mode!r}")

"""Tests of batchlab.store: keys, the SQLite store, crash safety and concurrent writers."""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchlab.store import DEFAULT_FILENAME, Store, canonical_json, run_key, run_many
from batchlab.train.config import RunResult, TrainConfig

WORKER = Path(__file__).parent / "helpers" / "store_worker.py"
N_TRIALS = 30


def worker(*args: object) -> list[str]:
    return [sys.executable, str(WORKER), *map(str, args)]


def log_lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def reference_sweep(tmp_path: Path) -> dict[str, dict]:
    """Results of an uninterrupted sweep, by key."""
    db = tmp_path / "reference.db"
    subprocess.run(worker("sweep", db, tmp_path / "reference.log", N_TRIALS, 0), check=True, timeout=60)
    return {r.key: r.payload for r in Store(db).records()}


# ------------------------------------------------------------------------------------- keys


def test_key_is_stable_across_processes_and_hash_seeds():
    out = set()
    for seed in ("0", "1", "4242", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(worker("key"), env=env, capture_output=True, text=True, check=True, timeout=60)
        out.add(proc.stdout.strip())
    here = run_key(
        {"name": "digits-mlp", "n_train": 1437, "classes": list(range(10))},
        {"batch_size": 64, "lr": 0.1, "milestones": (0.5, 0.75), "seed": 3, "norm": None, "amp": False},
        experiment="e1",
    )
    assert out == {here}
    # pinned: a change of the key format would silently orphan every stored result
    assert here == "4ee8405d377bbbcd12103880f2beb8ed156891dd513a21317ed4e5f6975d9204", here


def test_key_ignores_order_and_container_type_but_not_values():
    a = run_key({"t": "x", "n": 1}, {"lr": 0.1, "milestones": (0.5,)})
    assert a == run_key({"n": 1, "t": "x"}, {"milestones": [0.5], "lr": 0.1})
    assert a == run_key({"n": 1.0, "t": "x"}, {"milestones": [0.5], "lr": 0.1})  # 1 and 1.0: same run
    assert len(a) == 64 and int(a, 16) >= 0
    assert a != run_key({"t": "y", "n": 1}, {"lr": 0.1, "milestones": (0.5,)})
    assert a != run_key({"t": "x", "n": 1}, {"lr": 0.1, "milestones": (0.5,)}, experiment="e2")
    assert run_key({}, {"lr": 0.1}) != run_key({}, {"lr": 0.1000000000000001})
    assert run_key({}, {"x": True}) != run_key({}, {"x": 1})
    assert run_key({}, {"x": None}) != run_key({}, {"x": 0})


def _changed(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.1
    if value is None:
        return 2
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (tuple, list)):
        return [*value, 0.5]
    raise AssertionError(f"no change rule for {value!r}")


def test_key_changes_when_any_train_config_field_changes():
    base = TrainConfig(batch_size=32, lr=0.05, seed=1).to_dict()
    task = {"name": "digits-mlp"}
    keys = {run_key(task, base)}
    for f in dataclasses.fields(TrainConfig):
        cfg = dict(base)
        cfg[f.name] = _changed(base[f.name])
        keys.add(run_key(task, cfg))
    assert len(keys) == len(dataclasses.fields(TrainConfig)) + 1
    assert run_key(task, TrainConfig(batch_size=32, lr=0.05, seed=1)) == run_key(task, base)  # dataclass == dict


def test_key_rejects_unhashable_inputs():
    with pytest.raises(TypeError, match="config.fn"):
        run_key({}, {"fn": object()})
    with pytest.raises(TypeError, match="keys must be str"):
        run_key({}, {1: "a"})
    with pytest.raises(TypeError, match="task_fingerprint must be a mapping"):
        run_key(["x"], {})  # type: ignore[arg-type]
    assert canonical_json({"b": 1, "a": [1.5, float("nan")]}) == '{"a":[1.5,NaN],"b":1}'


# ------------------------------------------------------------------------------------- store basics


def test_put_get_query_and_status(tmp_path):
    store = Store(tmp_path)  # a directory: the default file name inside it
    assert store.path == (tmp_path / DEFAULT_FILENAME).resolve()
    assert store.get("nope") is None and "nope" not in store
    result = RunResult(task="t", config={"lr": 0.1}, history=[{"step": 1, "val_acc": 0.5}], final={"val_acc": 0.5})
    assert store.put("k1", result, kind="exp1")  # to_dict() is called
    store.put("k2", {"status": "diverged", "final": {"val_loss": float("nan")}}, kind="exp1")
    store.put("k3", {"status": "ok", "x": 3}, kind="exp2")
    assert RunResult.from_dict(store.get("k1")) == result
    assert [p["status"] for p in store.query(kind="exp1")] == ["ok", "diverged"]
    assert store.query(kind="exp2") == [{"status": "ok", "x": 3}]
    assert [r.key for r in store.records(status=["diverged"])] == ["k2"]
    assert store.kinds() == ["exp1", "exp2"] and len(store) == 3
    assert store.get("k2")["final"]["val_loss"] != store.get("k2")["final"]["val_loss"]  # NaN survives
    created = store.record("k3").created
    assert not store.put("k3", {"x": 4}, overwrite=False) and store.get("k3")["x"] == 3
    assert store.put("k3", {"x": 5}, kind="exp2") and store.get("k3") == {"x": 5}
    assert store.record("k3").created == created and store.record("k3").status == "ok"
    assert store.delete("k3") and not store.delete("k3")
    with sqlite3.connect(store.path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="path must be a file or directory path, got ':memory:'"):
        Store(":memory:")
    with pytest.raises(ValueError, match="timeout must be positive"):
        Store(tmp_path / "a.db", timeout=0)
    store = Store(tmp_path / "a.db")
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        store.put("", {})
    with pytest.raises(TypeError, match="not JSON-serializable"):
        store.put("k", {"x": object()})
    with pytest.raises(TypeError, match="must be a dict"):
        store.put("k", 3)
    with pytest.raises(ValueError, match=r"payload\['status'\]"):
        store.put("k", {"status": 1})
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError, match="junk.db"):
        Store(tmp_path / "junk.db")


def test_run_or_load_runs_once_and_records_failures(tmp_path):
    store = Store(tmp_path / "s.db")
    calls = []

    def fn(status: str = "ok"):
        calls.append(status)
        return {"status": status, "n": len(calls)}

    assert store.run_or_load("a", fn) == {"status": "ok", "n": 1}
    assert store.run_or_load("a", fn) == {"status": "ok", "n": 1} and len(calls) == 1
    assert store.run_or_load("f", lambda: fn("failed"))["status"] == "failed"
    assert store.run_or_load("f", fn)["status"] == "failed" and len(calls) == 2  # kept by default
    assert store.run_or_load("f", fn, retry_failed=True) == {"status": "ok", "n": 3}
    assert store.run_or_load("d", lambda: fn("diverged"))["status"] == "diverged"
    assert store.run_or_load("d", fn, retry_failed=True)["status"] == "diverged"  # not an accident
    assert len(calls) == 4
    with pytest.raises(ZeroDivisionError):
        store.run_or_load("z", lambda: 1 / 0)
    assert "z" not in store


def test_run_many_skips_done_and_records_exceptions(tmp_path):
    store = Store(tmp_path / "s.db")
    calls = []

    def fn(i: int) -> dict:
        calls.append(i)
        if i == 2:
            raise RuntimeError("trial 2 broke")
        if i == 3:
            raise MemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return {"status": "ok", "i": i}

    items = [(run_key({}, {"i": i}), i) for i in range(5)]
    out = run_many(store, items, fn, progress=False, kind="m")
    assert [p["status"] for p in out] == ["ok", "ok", "failed", "oom", "ok"]
    assert "RuntimeError: trial 2 broke" in out[2]["error"] and "Traceback" in out[2]["traceback"]
    assert run_many(store, items, fn, progress=False) == out and calls == [0, 1, 2, 3, 4]
    again = run_many(store, items, fn, progress=False, retry_failed=True)
    assert calls == [0, 1, 2, 3, 4, 2, 3] and [p["status"] for p in again] == ["ok", "ok", "failed", "oom", "ok"]
    with pytest.raises(ValueError, match=r"items\[0\] must be a \(key, args\) pair"):
        run_many(store, ["k"], fn)  # type: ignore[list-item]


def test_run_many_shows_progress(tmp_path, capsys):
    store = Store(tmp_path / "s.db")
    run_many(store, [(f"k{i}", i) for i in range(3)], lambda i: {"i": i}, kind="bar-test")
    assert "bar-test" in capsys.readouterr().err


def test_store_pickles_and_survives_fork(tmp_path):
    store = Store(tmp_path / "s.db")
    store.put("parent-0", {"i": 0})
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get("parent-0") == {"i": 0}
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_fork_child, args=(store, c)) for c in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store.put("parent-1", {"i": 1})  # the parent's connection still works after the children exited
    assert len(store) == 2 + 2 * 50
    assert store.integrity_check() == "ok"


def _fork_child(store: Store, c: int) -> None:
    for i in range(50):
        store.put(f"child{c}-{i}", {"c": c, "i": i})


# ------------------------------------------------------------------------------------- crashes and races


def test_sigkilled_sweep_resumes_without_loss_or_rerun(tmp_path):
    db, log = tmp_path / "sweep.db", tmp_path / "exec.log"
    proc = subprocess.Popen(worker("sweep", db, log, N_TRIALS, 0.05))
    try:
        wait_for(lambda: len(log_lines(log)) >= 10, what="10 trials to start")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    committed = {r.key for r in Store(db).records()}
    before = log_lines(log)
    assert 5 <= len(committed) < N_TRIALS, len(committed)
    in_flight = set(before) - committed  # started but killed before its row was committed

    subprocess.run(worker("sweep", db, log, N_TRIALS, 0.0), check=True, timeout=60)

    counts = collections.Counter(log_lines(log))
    reference = reference_sweep(tmp_path)
    assert set(counts) == set(reference)
    ran_twice = {k for k, c in counts.items() if c > 1}
    assert not ran_twice & committed, "a trial whose result was committed ran again"
    assert ran_twice <= in_flight and len(in_flight) <= 1
    assert sum(counts.values()) == N_TRIALS + len(in_flight)
    store = Store(db)
    rows = store.records()
    assert len(rows) == N_TRIALS and len({r.key for r in rows}) == N_TRIALS
    assert {r.key: r.payload for r in rows} == reference
    assert store.integrity_check() == "ok"


def test_repeated_sigkills_at_random_points(tmp_path):
    """Kill a fast sweep (commits back to back) several times at arbitrary instants."""
    db, log = tmp_path / "sweep.db", tmp_path / "exec.log"
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(worker("sweep", db, log, N_TRIALS, 0.01))
        time.sleep(rng.uniform(0.05, 0.25))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            kills += 1
        committed = {r.key for r in Store(db).records()}
        counts = collections.Counter(log_lines(log))
        assert all(counts[k] >= 1 for k in committed)
    assert kills >= 1
    subprocess.run(worker("sweep", db, log, N_TRIALS, 0.0), check=True, timeout=60)
    counts = collections.Counter(log_lines(log))
    reference = reference_sweep(tmp_path)
    assert set(counts) == set(reference)
    assert sum(counts.values()) <= N_TRIALS + kills  # at most the one in-flight trial per kill reruns
    store = Store(db)
    assert {r.key: r.payload for r in store.records()} == reference and len(store) == N_TRIALS
    assert store.integrity_check() == "ok"


def test_two_concurrent_writers_lose_nothing(tmp_path):
    db = tmp_path / "race.db"
    Store(db)  # create the schema once, so both writers start on equal terms
    n, shared = 300, 150
    procs = [
        subprocess.Popen(worker("write", db, tmp_path / f"{name}.json", name, n, shared)) for name in ("A", "B")
    ]
    time.sleep(0.3)
    Path(str(db) + ".go").touch()
    for p in procs:
        assert p.wait(60) == 0
    store = Store(db)
    assert len(store) == 2 * n + shared
    for name in ("A", "B"):
        rows = store.records(kind=name)
        assert sorted(r.payload["i"] for r in rows) == list(range(n))
        assert all(r.payload["writer"] == name for r in rows)
    stored_shared = {r.key: r.payload for r in store.records(kind="shared")}
    assert len(stored_shared) == shared
    got_a = json.loads((tmp_path / "A.json").read_text())
    got_b = json.loads((tmp_path / "B.json").read_text())
    assert got_a == stored_shared == got_b  # both processes returned the winning row
    assert {p["writer"] for p in stored_shared.values()} <= {"A", "B"}
    assert store.integrity_check() == "ok"


def test_a_new_path_without_a_suffix_is_a_folder(tmp_path) -> None:
    s = Store(tmp_path / "runs")  # as docs/scale-out.md writes it
    assert (tmp_path / "runs").is_dir() and s.path == (tmp_path / "runs" / "batchlab.db").resolve()
    s.close()
    assert Store(tmp_path / "runs").path == s.path  # an existing folder: the same file
    f = Store(tmp_path / "other.db")
    assert (tmp_path / "other.db").is_file() and f.path.name == "other.db"
    (tmp_path / "plain").write_bytes(b"")  # an existing suffix-less file stays a file
    assert Store(tmp_path / "plain").path == (tmp_path / "plain").resolve()


def test_damaged_rows_and_files_are_named_as_damage_with_the_store(tmp_path) -> None:
    # a row that is not JSON said only "Expecting property name ..."; a garbage file opened read-only
    # said "cannot open ... read-only", as if the folder were not writable
    import sqlite3

    from batchlab.store import Store, StoreError

    with Store(tmp_path / "a.db") as st:
        st.put("k", {"status": "ok"}, kind="x")
    con = sqlite3.connect(tmp_path / "a.db")
    con.execute("UPDATE runs SET payload = '{bad' WHERE key = 'k'")
    con.commit()
    con.close()
    with Store(tmp_path / "a.db") as st, pytest.raises(StoreError, match=r"a\.db: the stored result k is damaged \(not JSON"):
        st.get("k")
    (tmp_path / "b.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match=r"b\.db is damaged"):
        Store(tmp_path / "b.db", readonly=True)

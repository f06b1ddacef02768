"""Results store: an embedded SQLite database of runs keyed by a stable hash.

Sweeps and experiments look a key up before running it, so an interrupted sweep resumes with
nothing lost and no completed run executed twice::

    store = Store("out/batchlab.db")          # the file (a folder also works: Store("out") -> out/batchlab.db)
    key = run_key(task.fingerprint(), config.to_dict())
    result = store.run_or_load(key, lambda: fit(task, config).to_dict(), kind="sweep-lr")

How it stays safe:

- WAL journal with ``synchronous=NORMAL``: readers never block the writer, a commit is one append to
  the write-ahead log, and a process killed at any instant (SIGKILL included) leaves the database
  consistent. What ``NORMAL`` gives up is only durability of the last commits on *power loss*
  (not on a process crash): those runs would simply run again.
- Every write is one short ``BEGIN IMMEDIATE`` transaction. Taking the write lock up front avoids
  SQLite's "busy snapshot" error that a deferred transaction gets when it upgrades a stale read
  lock to a write lock in WAL mode; the connection's ``timeout`` makes writers wait for each other.
- A new result is inserted with ``INSERT ... ON CONFLICT DO NOTHING`` and then read back: when two
  processes race on the same key, the first commit wins and both return that stored row.
- One connection per process, opened lazily: after ``fork`` the child opens its own connection and
  never touches (or closes) the parent's, as SQLite requires.
- Checked at open: ``PRAGMA quick_check`` walks every page, so a file damaged anywhere (a torn copy,
  a bad disk sector) raises :class:`StoreError` naming the file *before* anything is looked up or run;
  a damaged store is never read as "missing" and never gets fresh rows (or failures) written over the
  good ones. Every other open failure (no such folder, not a database, permission) is a
  :class:`StoreError` naming the file too.
- ``Store(path, readonly=True)`` reads a store without writing anything, also from read-only media
  (a WAL database normally needs write access next to it for its shared-memory file; when that
  cannot be had the file is opened as ``immutable``), e.g. to rebuild a report from an archive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import sqlite3
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_FILENAME",
    "RETRYABLE_STATUSES",
    "Record",
    "Store",
    "StoreError",
    "canonical_json",
    "run_key",
    "run_many",
]

DEFAULT_FILENAME = "batchlab.db"
RETRYABLE_STATUSES = ("failed", "oom")  # statuses that run_or_load(retry_failed=True) runs again
KEY_VERSION = 1  # bump only when the key format has to change (every stored key then misses)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key      TEXT PRIMARY KEY,
    kind     TEXT NOT NULL DEFAULT '',
    status   TEXT NOT NULL,
    payload  TEXT NOT NULL,
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_kind ON runs (kind, created);
"""

# Connections inherited through fork(). They must not be used or closed in the child (closing one
# could checkpoint or delete the parent's WAL because fcntl locks are not inherited), and letting
# the object be garbage collected would close it, so they are parked here for the process' life.
_INHERITED: list[sqlite3.Connection] = []

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# keys


def _canonical(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON data whose serialization does not depend on the process."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        # 1 and 1.0 describe the same run (epochs=1 vs epochs=1.0): hash them alike.
        if math.isfinite(f) and f.is_integer() and abs(f) < 2**53:
            return int(f)
        return f  # repr(float) is the shortest round-tripping form: identical in every process
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: mapping keys must be str, got {k!r} ({type(k).__name__})")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"{where}: cannot hash a value of type {type(value).__name__} ({value!r}); "
        "use JSON data (dict, list, str, int, float, bool, None) or a dataclass"
    )


def canonical_json(value: Any) -> str:
    """Serialize ``value`` to the canonical JSON text that :func:`run_key` hashes.

    Keys are sorted, separators fixed, tuples become lists, integral floats become ints and other
    floats use Python's shortest round-trip ``repr`` -- so the text is the same in every process,
    whatever ``PYTHONHASHSEED`` is. NaN and infinities are written as ``NaN``/``Infinity``.
    """
    return json.dumps(_canonical(value, "value"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def run_key(task_fingerprint: Mapping[str, Any], config: Mapping[str, Any] | Any, **extra: Any) -> str:
    """Stable identifier of one run: the sha256 of the canonical JSON of its inputs.

    Args:
        task_fingerprint: what identifies the task (name, dataset size, model, ...).
        config: the training configuration as a dict (``TrainConfig.to_dict()``) or a dataclass.
            The seed is part of the config, so each seed is its own run.
        **extra: anything else that changes the result (experiment id, code version, ...).

    Returns:
        64 lowercase hex characters. Changing any value changes the key; key order does not.
    """
    if not isinstance(task_fingerprint, Mapping):
        raise TypeError(f"task_fingerprint must be a mapping, got {type(task_fingerprint).__name__}")
    doc = {"v": KEY_VERSION, "task": task_fingerprint, "config": config, "extra": extra}
    return hashlib.sha256(canonical_json(doc).encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------
# store


@dataclass(frozen=True)
class Record:
    """One stored row."""

    key: str
    kind: str
    status: str
    payload: dict[str, Any]
    created: float  # Unix time of the first insert
    updated: float  # Unix time of the last write


def _to_payload(result: Any) -> dict[str, Any]:
    if hasattr(result, "to_dict") and callable(result.to_dict):
        result = result.to_dict()
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    if not isinstance(result, Mapping):
        raise TypeError(f"a stored result must be a dict or have to_dict(); got {type(result).__name__}")
    return dict(result)


def _dumps(payload: Mapping[str, Any]) -> str:
    try:
        return json.dumps(payload, allow_nan=True, separators=(",", ":"))
    except TypeError as e:
        raise TypeError(f"payload is not JSON-serializable: {e}") from None


def _status_of(payload: Mapping[str, Any]) -> str:
    status = payload.get("status", "ok")
    if not isinstance(status, str) or not status:
        raise ValueError(f"payload['status'] must be a non-empty string, got {status!r}")
    return status


class StoreError(sqlite3.DatabaseError):
    """The results store cannot be opened or is damaged; the message names the file."""


class Store:
    """A SQLite database of run results, safe to share between processes.

    Args:
        path: the database file, or a directory (the file is then ``path/batchlab.db``): an
            existing one, or a new path without a suffix (``Store("runs")`` makes ``runs/``; a
            file needs a name like ``runs.db``). Missing parent directories are created. ``":memory:"`` is refused: a store must be
            shareable between processes.
        timeout: seconds a writer waits for another process' write lock before failing.
        readonly: open an existing store for reading only (writes raise :class:`StoreError`);
            works on read-only media. Nothing is created.

    Raises:
        StoreError: the file cannot be opened or created, is not a results store, or fails
            SQLite's integrity check (the message names the file and what was wrong).
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0, *, readonly: bool = False) -> None:
        if os.fspath(path) in ("", ":memory:"):
            raise ValueError(f"path must be a file or directory path, got {os.fspath(path)!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        p = Path(path)
        if p.is_dir() or (not p.exists() and not p.suffix and not readonly):
            p = p / DEFAULT_FILENAME
        self.path: Path = p.resolve()
        self.timeout = float(timeout)
        self.readonly = bool(readonly)
        self._local = threading.local()
        if self.readonly:
            if not self.path.is_file():
                raise StoreError(f"cannot open results store {self.path} read-only: no such file")
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot open results store {self.path}: cannot create its folder: {e.strerror or e}") from e
            if self.path.is_dir():
                raise StoreError(f"cannot open results store {self.path}: it is a folder, not a database file")
        conn = self._conn()  # fail early (bad path, not a database) and create the schema
        try:
            problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(f"results store {self.path} is damaged ({e}); restore it from a copy or move it away "
                             "to start afresh (nothing was read from it or written to it)") from e
        if problems != ["ok"]:
            self.close()
            raise StoreError(f"results store {self.path} is damaged ({'; '.join(problems[:3])}); restore it from a copy "
                             "or move it away to start afresh (nothing was read from it or written to it)")

    @classmethod
    def in_dir(cls, out_dir: str | os.PathLike[str], timeout: float = 60.0) -> Store:
        """The store of an output directory, ``out_dir/batchlab.db`` (the directory is created)."""
        return cls(Path(out_dir) / DEFAULT_FILENAME, timeout=timeout)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # pickling (multiprocessing spawn, Ray): ship the path, reconnect on the other side
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "timeout": self.timeout, "readonly": self.readonly}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.timeout = state["path"], state["timeout"]
        self.readonly = state.get("readonly", False)
        self._local = threading.local()

    # ---------------------------------------------------------------- connection
    def _conn(self) -> sqlite3.Connection:
        local = self._local
        pid = os.getpid()
        conn = getattr(local, "conn", None)
        if conn is not None and local.pid == pid:
            return conn
        if conn is not None:  # inherited through fork: leave it alone (see _INHERITED)
            _INHERITED.append(conn)
        conn = self._open_readonly() if self.readonly else self._open_readwrite()
        local.conn, local.pid = conn, pid
        return conn

    def _connect(self, target: str | Path, uri: bool = False) -> sqlite3.Connection:
        try:
            return sqlite3.connect(target, timeout=self.timeout, isolation_level=None, check_same_thread=True, uri=uri)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open results store {self.path}: {e}") from e

    def _open_readonly(self) -> sqlite3.Connection:
        base = "file:" + urllib.parse.quote(str(self.path))
        last: Exception | None = None
        # mode=ro shares the WAL with writers; on read-only media (no -shm can be made) only an
        # immutable open can read the file, which then must not change while it is open.
        for query in ("?mode=ro", "?immutable=1"):
            conn = self._connect(base + query, uri=True)
            try:
                conn.execute("SELECT COUNT(*) FROM runs").fetchone()
                return conn
            except sqlite3.DatabaseError as e:
                conn.close()
                last = e
                if "no such table" in str(e):
                    break
        if last is not None and "not a database" in str(last):
            raise StoreError(f"results store {self.path} is damaged ({last}); restore it from a copy or move it away "
                             "to start afresh (nothing was read from it or written to it)") from last
        raise StoreError(f"cannot open results store {self.path} read-only: {last}") from last

    def _open_readwrite(self) -> sqlite3.Connection:
        conn = self._connect(self.path)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not switch {self.path} to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            with _write(conn):
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"cannot open results store {self.path}: {e}") from e
        return conn

    def _write_conn(self) -> sqlite3.Connection:
        if self.readonly:
            raise StoreError(f"results store {self.path} was opened read-only; it cannot store results")
        return self._conn()

    def close(self) -> None:
        """Close this thread's connection (a later call reopens it)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- reads
    def record(self, key: str) -> Record | None:
        """The stored row of ``key``, or None."""
        row = self._conn().execute(
            "SELECT key, kind, status, payload, created, updated FROM runs WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else _record(row, self.path)

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored payload of ``key``, or None when it was never stored."""
        rec = self.record(key)
        return None if rec is None else rec.payload

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._conn().execute(
            "SELECT 1 FROM runs WHERE key = ?", (key,)
        ).fetchone() is not None

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def records(self, kind: str | None = None, status: str | Sequence[str] | None = None) -> list[Record]:
        """Stored rows, oldest first, optionally only those of ``kind`` and/or ``status``."""
        sql = "SELECT key, kind, status, payload, created, updated FROM runs"
        where, args = [], []  # type: list[str], list[Any]
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created, rowid"
        return [_record(r, self.path) for r in self._conn().execute(sql, args).fetchall()]

    def query(self, kind: str | None = None, status: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Payloads of the stored rows, oldest first (see :meth:`records`)."""
        return [r.payload for r in self.records(kind=kind, status=status)]

    def kinds(self) -> list[str]:
        """The distinct ``kind`` labels in the store, sorted."""
        return [r[0] for r in self._conn().execute("SELECT DISTINCT kind FROM runs ORDER BY kind")]

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` for a healthy database."""
        rows = self._conn().execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)

    # ---------------------------------------------------------------- writes
    def put(self, key: str, payload: Any, kind: str = "", overwrite: bool = True) -> bool:
        """Store ``payload`` (a JSON-able dict, or an object with ``to_dict()``) under ``key``.

        Args:
            key: the run's key (see :func:`run_key`).
            payload: the result; its ``"status"`` (default ``"ok"``) is stored in its own column.
            kind: a label to query by (experiment id, sweep name).
            overwrite: replace an existing row (keeping its ``created`` time); when False an
                existing row is left untouched.

        Returns:
            True when the row was written.
        """
        _check_key(key)
        kind = _check_kind(kind)
        data = _to_payload(payload)
        text, status, now = _dumps(data), _status_of(data), time.time()
        conn = self._write_conn()
        with _write(conn):
            if overwrite:
                cur = conn.execute(
                    "INSERT INTO runs (key, kind, status, payload, created, updated) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET kind = excluded.kind, status = excluded.status, "
                    "payload = excluded.payload, updated = excluded.updated",
                    (key, kind, status, text, now, now),
                )
            else:
                cur = conn.execute(
                    "INSERT INTO runs (key, kind, status, payload, created, updated) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(key) DO NOTHING",
                    (key, kind, status, text, now, now),
                )
        return cur.rowcount > 0

    def delete(self, key: str) -> bool:
        """Remove ``key``'s row; True when there was one."""
        conn = self._write_conn()
        with _write(conn):
            cur = conn.execute("DELETE FROM runs WHERE key = ?", (key,))
        return cur.rowcount > 0

    def run_or_load(
        self, key: str, fn: Callable[[], Any], kind: str = "", retry_failed: bool = False
    ) -> dict[str, Any]:
        """Return the stored result of ``key``; when there is none, run ``fn()`` and store it.

        A result whose status is not ``"ok"`` is stored too (a failing trial is a result). It is
        returned as it is unless ``retry_failed`` is True, in which case statuses ``"failed"`` and
        ``"oom"`` are run again and replaced (``"diverged"`` is a property of the config, not an
        accident, so it is never retried).

        When two processes race on the same missing key both run ``fn``; the first commit wins
        and both return the stored (winning) payload. An exception raised by ``fn`` propagates and
        nothing is stored (:func:`run_many` records it instead).

        Args:
            key: the run's key (see :func:`run_key`).
            fn: computes the result: a JSON-able dict or an object with ``to_dict()``.
            kind: label stored with a new row.
            retry_failed: rerun a stored result with status in ``RETRYABLE_STATUSES``.

        Returns:
            The stored payload (JSON round-tripped: tuples come back as lists).
        """
        _check_key(key)
        kind = _check_kind(kind)
        rec = self.record(key)
        if rec is not None and not (retry_failed and rec.status in RETRYABLE_STATUSES):
            return rec.payload
        data = _to_payload(fn())
        text, status, now = _dumps(data), _status_of(data), time.time()
        conn = self._write_conn()
        with _write(conn):
            if rec is None:
                conn.execute(
                    "INSERT INTO runs (key, kind, status, payload, created, updated) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(key) DO NOTHING",
                    (key, kind, status, text, now, now),
                )
            else:  # a retry replaces only a row that is still a retryable failure
                marks = ",".join("?" * len(RETRYABLE_STATUSES))
                conn.execute(
                    f"UPDATE runs SET status = ?, payload = ?, updated = ? WHERE key = ? AND status IN ({marks})",
                    (status, text, now, key, *RETRYABLE_STATUSES),
                )
        stored = self.record(key)
        assert stored is not None, f"row {key} vanished after insert"
        return stored.payload


class _write:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def _record(row: tuple[Any, ...], path: Any = None) -> Record:
    key, kind, status, payload, created, updated = row
    try:
        data = json.loads(payload)
    except (TypeError, ValueError) as e:
        raise StoreError(f"results store {path}: the stored result {str(key)[:16]} is damaged (not JSON: {e}); restore "
                         "the store from a copy, or delete that row (Store.delete(key)) to run it again") from e
    return Record(key=key, kind=kind, status=status, payload=data, created=created, updated=updated)


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string (see run_key), got {key!r}")


def _check_kind(kind: Any) -> str:
    if kind is None:
        return ""
    if not isinstance(kind, str):
        raise ValueError(f"kind must be a string label, got {kind!r}")
    return kind


# --------------------------------------------------------------------------------------------
# sweeps


def _failure(exc: BaseException) -> dict[str, Any]:
    text = f"{type(exc).__name__}: {exc}"
    oom = "OutOfMemoryError" in type(exc).__name__ or "out of memory" in str(exc).lower()
    return {
        "status": "oom" if oom else "failed",
        "error": text,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=20)),
    }


def run_many(
    store: Store,
    items: Iterable[tuple[str, T]],
    fn: Callable[[T], Any],
    progress: bool = True,
    kind: str = "",
    retry_failed: bool = False,
    desc: str | None = None,
) -> list[dict[str, Any]]:
    """Run ``fn(args)`` for every ``(key, args)`` item whose key is not stored yet.

    An exception raised by one item is stored as ``{"status": "failed" (or "oom"), "error": ...,
    "traceback": ...}`` and the sweep goes on (``KeyboardInterrupt`` still stops it).
    Interrupt and call again with the same items: finished items are loaded, not rerun.

    Args:
        store: where results are looked up and stored.
        items: ``(key, args)`` pairs; ``args`` is passed to ``fn`` as its one argument.
        fn: runs one item and returns a JSON-able dict or an object with ``to_dict()``.
        progress: show a tqdm progress bar on stderr.
        kind: label stored with new rows.
        retry_failed: run again items stored as ``"failed"``/``"oom"``.
        desc: progress bar label (default: ``kind`` or ``"runs"``).

    Returns:
        The stored payloads, in the order of ``items``.
    """
    items = list(items)
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"items[{i}] must be a (key, args) pair, got {item!r}")
        _check_key(item[0])
    from tqdm.auto import tqdm

    def finished(key: str) -> Record | None:
        rec = store.record(key)
        return rec if rec is not None and not (retry_failed and rec.status in RETRYABLE_STATUSES) else None

    counted = {key for key, _ in items if finished(key) is not None}  # shown as done from the start

    def guarded(args: T) -> Callable[[], Any]:
        def call() -> Any:
            try:
                return _to_payload(fn(args))
            except Exception as e:  # noqa: BLE001 - a failing trial is a result, recorded below
                return _failure(e)

        return call

    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(items), initial=len(counted), desc=desc or kind or "runs", unit="run", disable=not progress)
    with bar:
        for key, args in items:
            rec = finished(key)
            if rec is not None:
                results.append(rec.payload)
            else:
                results.append(store.run_or_load(key, guarded(args), kind=kind, retry_failed=retry_failed))
            if key not in counted:
                bar.update(1)
    return results

"""``reproduce()``: run the experiments, write their data, figures and verdicts, then the report."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from batchlab.experiments.base import Experiment, ExperimentContext, Outcome, Verdict, experiments, one_thread
from batchlab.fileio import OutputError, atomic_open, atomic_write
from batchlab.store import Store

DEFAULT_SEEDS_FULL = 3
DEFAULT_SEEDS_QUICK = 2


def select(only: Sequence[str] | None = None) -> list[type[Experiment]]:
    """Experiments whose claim ids or experiment ids are in ``only`` (all when None).

    Raises:
        ValueError: for an id that matches nothing, listing the known ones.
    """
    exps = experiments()
    if not only:
        return list(exps.values())
    wanted = [w.strip() for w in only if w.strip()]
    known_claims = sorted({c for e in exps.values() for c in e.claims})
    chosen: list[type[Experiment]] = []
    for w in wanted:
        hits = [e for e in exps.values() if w.upper() in e.claims or w == e.id]
        if not hits:
            raise ValueError(f"--only {w!r} matches no experiment; known claims: {', '.join(known_claims)}")
        chosen += [h for h in hits if h not in chosen]
    return sorted(chosen, key=lambda e: (min(e.claims), e.id))


def rerun_command(exp: type[Experiment], quick: bool, out: Path) -> str:
    return f"batchlab reproduce --only {','.join(exp.claims)}{' --quick' if quick else ''} --out {out}"


def run_experiment(
    exp_cls: type[Experiment], *, quick: bool, seeds: list[int], device: str, store: Store, out: Path, progress: bool,
    backend: Any = None, retry_failed: bool = False,
) -> Outcome:
    """Run one experiment and write ``out/<id>/{data.json, outcome.json, *.png}``.

    A failing experiment is recorded as ``status="failed"`` with its traceback; nothing raises.
    """
    exp = exp_cls()
    folder = out / exp.id
    folder.mkdir(parents=True, exist_ok=True)
    params = exp.params_for(quick, device)
    params = {**params, "seeds": seeds}
    ctx = ExperimentContext(exp.id, quick, seeds, device, store, folder, progress, backend=backend,
                            retry_failed=retry_failed)
    ctx.bar = tqdm(desc=f"  {exp.id} trials", unit="trial", disable=not progress, leave=False)
    t0 = time.perf_counter()
    figures: list[str] = []
    verdicts: list[Verdict] = []
    status, error = "ok", None
    try:
        # the runner's policy for CPU experiments: one torch thread (see base.one_thread)
        with one_thread(device):
            data = exp.run(ctx, params)
        atomic_write(folder / "data.json", json.dumps(data, indent=1, default=_json_default))
        verdicts = exp.decide(data, params)
        for i, fig in enumerate(exp.plot(data, params)):
            path = folder / f"figure{i + 1}.png"
            with atomic_open(path) as f:  # a concurrent reader sees the old PNG or the new one, never half
                fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
            figures.append(str(path.relative_to(out)))
            import matplotlib.pyplot as plt

            plt.close(fig)
    except (sqlite3.DatabaseError, OutputError):
        # a damaged results store or an output that cannot be written is not the experiment's
        # failure: stop here, leaving the earlier outcome.json (and its verdicts) as they were
        raise
    except Exception:  # noqa: BLE001 - one failing experiment must not stop the suite
        status, error = "failed", traceback.format_exc(limit=30)
    finally:
        ctx.bar.close()
    got = {v.claim for v in verdicts}
    for claim in exp.claims:
        if claim not in got:
            reason = "the experiment failed before a verdict was computed" if status == "failed" else "no verdict returned"
            verdicts.append(Verdict(claim, "inconclusive", reason))
    wall = time.perf_counter() - t0
    compute = wall
    if ctx.trials_run == 0 and (folder / "outcome.json").is_file():
        try:
            earlier = json.loads((folder / "outcome.json").read_text())
        except (OSError, ValueError):
            earlier = {}
        if earlier.get("quick") == quick and earlier.get("seeds") == seeds:
            compute = float(earlier.get("compute_time") or earlier.get("wall_time") or wall)
    outcome = Outcome(
        id=exp.id, claims=list(exp.claims), title=exp.title, status=status,
        verdicts=[v.__dict__ for v in verdicts], params=params, figures=figures, compute_time=compute,
        wall_time=wall, trials_run=ctx.trials_run, trials_loaded=ctx.trials_loaded,
        quick=quick, seeds=seeds, command=rerun_command(exp_cls, quick, out), seed_doc=exp.seed_doc,
        statements=dict(exp.statements), rules=dict(exp.rules), validity=dict(exp.validity), error=error,
    )
    atomic_write(folder / "outcome.json", json.dumps(outcome.to_dict(), indent=1, default=_json_default))
    return outcome


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


def reproduce(
    *,
    only: Sequence[str] | None = None,
    quick: bool = False,
    out: str | Path = "batchlab-out/reproduce",
    seeds: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    backend: Any = None,
    retry_failed: bool = False,
) -> list[Outcome]:
    """Run the claim experiments and write ``out/index.html``.

    Args:
        only: claim ids (``"C10"``) or experiment ids to run; all when None.
        quick: the small configuration (the whole suite in minutes on a 2-core CPU).
        out: output folder; its ``batchlab.db`` caches every trial, so a rerun is instant and an
            interrupted run resumes.
        seeds: number of seeds (default 3, or 2 with ``quick``).
        device: ``"cpu"`` or ``"cuda"``.
        progress: progress bars on stderr.
        backend: where ``ctx.fit_many`` trials run (e.g. ``RayBackend``); None: in this process.
        retry_failed: run again the stored trials that ended "failed" or "oom" (after fixing their
            cause); "diverged" is a property of the configuration and is kept.
    """
    n_seeds = seeds if seeds is not None else (DEFAULT_SEEDS_QUICK if quick else DEFAULT_SEEDS_FULL)
    if not isinstance(n_seeds, int) or isinstance(n_seeds, bool) or n_seeds < 2:
        raise ValueError(f"seeds must be an integer >= 2 (the verdicts weigh effects against the seed-to-seed "
                         f"spread), got {seeds!r}")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    chosen = select(only)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "batchlab.db")
    outcomes: list[Outcome] = []
    bar = tqdm(chosen, desc="experiments", unit="exp", disable=not progress)
    for exp_cls in bar:
        bar.set_postfix_str(f"{exp_cls.id} ({','.join(exp_cls.claims)})")
        outcomes.append(
            run_experiment(exp_cls, quick=quick, seeds=list(range(n_seeds)), device=device, store=store, out=out,
                           progress=progress, backend=backend, retry_failed=retry_failed)
        )
    from batchlab.experiments.report import write_markdown, write_reproduce_report

    write_reproduce_report(out)
    write_markdown(out, out / "verdicts.md")
    return outcomes


def summary_table(outcomes: Sequence[Outcome]) -> str:
    """A plain-text table: claim, verdict, experiment, seconds."""
    rows = [("claim", "verdict", "experiment", "time"), ("-----", "-------", "----------", "----")]
    for o in outcomes:
        for v in o.verdicts:
            rows.append((v["claim"], v["verdict"] + ("" if o.status == "ok" else " (failed)"), o.id, f"{o.compute_time if o.compute_time is not None else o.wall_time:.0f}s"))
    rows[2:] = sorted(rows[2:])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def print_summary(outcomes: Sequence[Outcome], out: Path, file: Any = sys.stdout) -> None:
    print(summary_table(outcomes), file=file)
    print(f"\nreport: {Path(out) / 'index.html'}", file=file)

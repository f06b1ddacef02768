"""Successive halving over candidate batch sizes (Jamieson & Talwalkar 2016; Li et al. 2018, Hyperband),
as a pure function of a ``run(batches, budget, seeds, rung) -> trials`` callable.

Rung k gives every surviving candidate the same budget ``budget_k`` (examples for the "epochs"
objective, seconds for "time"); the better ``1/eta`` of them (by seed-mean metric) are promoted to
rung k+1, whose budget is ``eta`` times larger, until one candidate is left. So every batch that
wins a rung is compared again, at a larger budget, with the other winners; many cheap runs screen,
few long ones decide.

A candidate that would take fewer than ``min_steps`` optimizer steps at a rung's budget is not run
there (a large batch given a few hundred examples would be judged on one or two steps, the bias
against large batches this search exists to avoid): it is promoted untested ("a bye") until a rung
gives it enough steps. A trial that fails (diverged, out of memory, error) ranks below every
successful one.

:func:`plan_rungs` sizes the rungs so that the whole search costs at most a given budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from batchlab.batchsize.objective import Objective, SeedStats


@dataclass
class RungTrial:
    """One short training run of the search."""

    batch: int
    seed: int
    rung: int
    metric: float  # validation metric, after precise BN when the model has BatchNorm (NaN unless "ok")
    status: str  # "ok", "diverged", "oom" or "failed"
    examples: int  # training examples processed
    seconds: float  # training time (evaluation excluded)
    steps: int = 0
    lr: float = math.nan
    accumulation: int = 1
    budget_examples: int = 0  # the trial's budget in examples
    extra: dict[str, Any] = field(default_factory=dict)  # metric_stale (before precise BN), bn_health, error


@dataclass
class Rung:
    """One rung: its budget, what ran, what was promoted."""

    index: int
    budget: float  # per trial: examples ("epochs") or seconds ("time")
    seeds: list[int]
    tested: list[int]
    byes: list[int]  # too few steps at this budget: promoted without a run
    stats: dict[str, dict[str, Any]]  # per tested batch: mean, se, n, failed, seconds, ended (non-ok statuses)
    promoted: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_stats(trials: Sequence[RungTrial]) -> tuple[SeedStats, dict[str, Any]]:
    """One batch's trials on a rung: their seed statistics (a failed trial counts as NaN), and the
    entry a :class:`Rung` keeps for it in ``stats`` (mean, se, n, failed, mean seconds per run, and
    how the runs that did not finish ended: "diverged", "oom", "failed")."""
    st = SeedStats.of([t.metric if t.status == "ok" else math.nan for t in trials])
    return st, {"mean": st.mean, "se": st.se, "n": st.n, "failed": st.failed,
                "seconds": sum(t.seconds for t in trials) / max(1, len(trials)),
                "ended": ", ".join(sorted({t.status for t in trials if t.status != "ok"}))}


def plan_rungs(n_candidates: int, available: float, eta: int = 2, seeds_last: int = 2, seeds_early: int = 1,
               per_trial_overhead: float = 0.0, extra_last: int = 0) -> list[tuple[int, float]]:
    """``[(candidates, budget per trial)]`` per rung so that the search costs at most ``available``.

    Rung k holds ``ceil(n / eta^k)`` candidates at budget ``b0 * eta^k`` until two or fewer are left
    (the last rung); early rungs run ``seeds_early`` seeds, the last ``seeds_last``. Each trial also
    costs ``per_trial_overhead`` (precise-BN passes). ``extra_last`` more trials at the last rung's
    budget are paid for too (kept for a climb after the search). Returns [] when nothing fits.
    """
    if n_candidates < 1:
        return []
    counts = [n_candidates]
    while counts[-1] > 2:
        counts.append(math.ceil(counts[-1] / eta))
    if n_candidates == 1:
        counts = [1]
    seeds = [seeds_early] * (len(counts) - 1) + [seeds_last]
    trials = sum(c * s for c, s in zip(counts, seeds)) + extra_last
    weight = sum(c * s * eta**k for k, (c, s) in enumerate(zip(counts, seeds))) + extra_last * eta ** (len(counts) - 1)
    b0 = (available - trials * per_trial_overhead) / weight
    if b0 <= 0:
        return []
    return [(c, b0 * eta**k) for k, c in enumerate(counts)]


def successive_halving(
    candidates: Sequence[int],
    budgets: Sequence[float],
    run: Callable[[list[int], float, list[int], int], list[RungTrial]],
    objective: Objective,
    seeds: Sequence[Sequence[int]],
    testable: Callable[[int, float], bool] = lambda b, budget: True,
    eta: int = 2,
    counts: Sequence[int] | None = None,
) -> tuple[list[Rung], list[RungTrial], list[int]]:
    """Run the rungs (see the module docstring).

    Args:
        candidates: batch sizes, in the prediction's order (best predicted first; it breaks ties).
        budgets: per-rung budget per trial (from :func:`plan_rungs`).
        run: ``run(batches, budget, seeds, rung) -> trials`` for every batch x seed.
        objective: the metric's direction (:meth:`Objective.sort_key`).
        seeds: per rung, the seeds to run.
        testable: ``testable(batch, budget)``: enough steps at this budget to be judged.
        eta: keep ``ceil(tested / eta)`` per rung.
        counts: the planned candidates per rung (:func:`plan_rungs`); when given, rung k promotes
            ``counts[k + 1]`` candidates in all, byes included (at least one that ran), so the search
            stays within its planned cost.

    Returns:
        ``(rungs, trials, survivors)``: survivors are the last rung's tested candidates (the final
        comparison), best first.
    """
    alive = list(dict.fromkeys(candidates))
    order = {b: i for i, b in enumerate(alive)}
    rungs: list[Rung] = []
    trials: list[RungTrial] = []
    last_tested: list[int] = []
    for k, budget in enumerate(budgets):
        tested = [b for b in alive if testable(b, budget)]
        byes = [b for b in alive if b not in tested]
        final = k == len(budgets) - 1
        if not tested and not final:
            rungs.append(Rung(k, budget, list(seeds[k]), [], byes, {}, list(alive)))
            continue
        ts = run(tested, budget, list(seeds[k]), k) if tested else []
        trials.extend(ts)
        per_batch = {b: batch_stats([t for t in ts if t.batch == b]) for b in tested}
        stats = {b: st for b, (st, _) in per_batch.items()}
        ranked = sorted(tested, key=lambda b: (0 if stats[b].ok else 1, objective.sort_key(stats[b].mean), order[b]))
        n_keep = math.ceil(len(ranked) / eta)
        if counts is not None and k + 1 < len(counts):
            n_keep = counts[k + 1] - len(byes)
        keep = ranked[: max(1, n_keep)] if not final else ranked
        if byes and not final:  # a batch whose runs all failed is not promoted while a bye can take its place
            keep = [b for b in keep if stats[b].n > 0]
        promoted = sorted(keep + byes, key=order.get) if not final else ranked
        rungs.append(Rung(
            k, budget, list(seeds[k]), tested, byes, {str(b): entry for b, (_, entry) in per_batch.items()}, promoted,
        ))
        if tested:
            last_tested = ranked
        alive = promoted
        if len(alive) <= 1 and not final and set(alive) <= set(tested):  # one left, already judged: done
            break
    return rungs, trials, last_tested

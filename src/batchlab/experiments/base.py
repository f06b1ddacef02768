"""The experiment framework behind ``batchlab reproduce``.

An :class:`Experiment` tests one or more claims of ``CLAIMS.md``. It declares its parameters for
the full and the ``--quick`` run, gathers data through :class:`ExperimentContext` (whose
``fit`` and ``cached`` go through the results store, so a rerun or an interrupted run costs
nothing twice), and then, as pure functions of that data, computes a verdict per claim with the
decision rule written in its code (:meth:`Experiment.decide`) and draws its figures
(:meth:`Experiment.plot`). ``decide`` never sees anything but the data, so tests can feed it
data built to make a claim false, or too noisy to tell.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from batchlab.runs import LocalRunner, Trial, results
from batchlab.store import RETRYABLE_STATUSES, Store, run_key
from batchlab.tasks import Task, get_task
from batchlab.train.config import RunResult, TrainConfig

VerdictName = Literal["supported", "refuted", "inconclusive", "observed", "not observed"]
#: for claims with a decision rule
DECIDED = ("supported", "refuted", "inconclusive")
#: for claims CLAIMS.md marks "reported as measured", and hedged ("may") claims: what was seen, no judgement
REPORTED = ("observed", "not observed", "inconclusive")
VERDICTS = ("supported", "refuted", "inconclusive", "observed", "not observed")
#: the prefix of a verdict whose pre-registered validity check failed (the task could not show the effect)
INVALID_PREFIX = "validity check failed: "


@dataclass
class Verdict:
    """The outcome of one claim's decision rule.

    Attributes:
        claim: the claim id, e.g. ``"C01"``.
        verdict: ``"supported"``, ``"refuted"`` or ``"inconclusive"``; for a claim reported as measured,
            ``"observed"``, ``"not observed"`` or ``"inconclusive"``.
        reason: one or two sentences saying which part of the rule decided it, with numbers.
        effect: the numbers the rule looked at (means, spreads over seeds, thresholds).
        valid: False when the experiment's pre-registered validity check failed (then the verdict is
            ``inconclusive``: the task could not show the effect, which says nothing against the claim).
        published: published numbers the experiment re-derives, next to the measured ones
            (``source``, ``published``, ``measured``, ``trend_agrees``); empty when none.
    """

    claim: str
    verdict: VerdictName
    reason: str
    effect: dict[str, Any] = field(default_factory=dict)
    valid: bool = True
    published: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}; got {self.verdict!r}")
        if not self.valid and self.verdict != "inconclusive":
            raise ValueError(f"a failed validity check gives 'inconclusive', never {self.verdict!r} ({self.claim})")

    @classmethod
    def invalid(cls, claim: str, check: str, effect: dict[str, Any] | None = None,
                published: dict[str, Any] | None = None) -> Verdict:
        """``inconclusive`` because the validity check failed: ``check`` says which condition and the numbers."""
        return cls(claim, "inconclusive", INVALID_PREFIX + check, dict(effect or {}), valid=False,
                   published=dict(published or {}))


def spread(values: Iterable[float]) -> dict[str, float]:
    """Mean, min, max, standard deviation and count of finite ``values`` (NaN-safe)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": math.nan, "min": math.nan, "max": math.nan, "std": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "min": min(vals),
        "max": max(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def fmt_spread(s: dict[str, float], digits: int = 3) -> str:
    """``mean [min..max] (n=k)`` for a :func:`spread` dict."""
    if not s.get("n"):
        return "n/a"
    return f"{s['mean']:.{digits}g} [{s['min']:.{digits}g}..{s['max']:.{digits}g}] (n={s['n']})"


def steps_to_target(history: Sequence[dict[str, Any]], target: float, key: str = "val_acc", x: str = "step") -> float:
    """The first ``x`` at which ``key`` reaches ``target``; ``inf`` if it never does."""
    for row in history:
        v = row.get(key)
        if v is not None and v >= target:
            return float(row[x])
    return math.inf


@contextlib.contextmanager
def one_thread(device: str = "cpu") -> Iterator[None]:
    """Run the body on one intra-op torch thread (CPU only), restoring the count afterwards.

    The built-in tasks' models are tiny: on a 2-core CPU one thread is as fast as two, and when
    other processes compete for the cores two threads spin and run 5-30x slower. The runner does
    this for every CPU experiment; experiments use it too so they behave the same when called
    directly (tests). Results do not depend on it; on CUDA nothing changes.
    """
    import torch

    if str(device).startswith("cuda"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ExperimentContext:
    """What an experiment's ``run`` gets: settings and a cached way to train."""

    experiment_id: str
    quick: bool
    seeds: list[int]
    device: str
    store: Store
    out_dir: Path
    progress: bool = False
    backend: Any = None  # a trial runner (batchlab.runs.Runner, e.g. the Ray backend); None: in-process
    bar: Any = None  # a tqdm bar counting this experiment's trials (set by the runner)
    retry_failed: bool = False  # run again stored trials whose status is "failed" or "oom"
    _tasks: dict[str, Task] = field(default_factory=dict)
    trials_run: int = 0
    trials_loaded: int = 0

    def task(self, spec: str, **kwargs: Any) -> Task:
        """A task by name, built once per distinct kwargs."""
        key = spec + repr(sorted(kwargs.items()))
        if key not in self._tasks:
            self._tasks[key] = get_task(spec, **kwargs)
        return self._tasks[key]

    def fit(self, task: Task | str, config: TrainConfig, *, model_fn: Callable[[], Any] | None = None,
            variant: str = "", **task_kwargs: Any) -> RunResult:
        """Train through the results store: a stored run is loaded, never rerun.

        Args:
            task: a Task or a name (built with ``task_kwargs``).
            config: the run's config; ``device`` is overridden by the context's.
            model_fn: build the model yourself (e.g. a variant the task can't make); give it a
                distinct ``variant`` string so its runs are stored under their own key.
            variant: part of the key, for anything the config does not say.
        """
        return self.run_trials([self.trial(task, config, model_fn=model_fn, variant=variant, **task_kwargs)])[0]

    def trial(self, task: Task | str, config: TrainConfig, *, model_fn: Callable[[], Any] | None = None,
              variant: str = "", **task_kwargs: Any) -> Trial:
        """The :class:`~batchlab.runs.Trial` of training ``task`` with ``config`` on the context's device."""
        t = self.task(task, **task_kwargs) if isinstance(task, str) else task
        return Trial(t, config.replace(device=self.device), model_fn=model_fn, variant=variant)

    def run_trials(self, trials: Sequence[Trial]) -> list[RunResult]:
        """Run ``trials`` with the context's runner (in this process, or the backend's, e.g. Ray),
        through the store, counting trials run and loaded on the experiment's progress bar."""
        before = sum(1 for t in trials if (rec := self.store.record(t.key())) is None
                     or (self.retry_failed and rec.status in RETRYABLE_STATUSES))
        payloads = (self.backend or LocalRunner()).run(trials, self.store, kind=f"experiment:{self.experiment_id}",
                                                       retry_failed=self.retry_failed)
        self.trials_run += before
        self.trials_loaded += len(trials) - before
        if self.bar is not None:
            self.bar.update(len(trials))
            self.bar.set_postfix(run=self.trials_run, loaded=self.trials_loaded, refresh=False)
        return results(payloads)

    def _through_store(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``store.run_or_load`` with the trial counters and the experiment's progress bar."""
        ran = False

        def run() -> dict[str, Any]:
            nonlocal ran
            ran = True
            return fn()

        payload = self.store.run_or_load(key, run, kind=f"experiment:{self.experiment_id}",
                                         retry_failed=self.retry_failed)
        if ran:
            self.trials_run += 1
        else:
            self.trials_loaded += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(run=self.trials_run, loaded=self.trials_loaded, refresh=False)
        return payload

    def fit_many(self, jobs: Sequence[tuple[Task | str, TrainConfig]], **task_kwargs: Any) -> list[RunResult]:
        """Several :meth:`fit` calls as one batch of trials: with a parallel runner (the runner's
        ``backend``, e.g. Ray) the missing ones run concurrently. Results come back in the order of ``jobs``."""
        return self.run_trials([self.trial(t, c, **task_kwargs) for t, c in jobs])

    def cached(self, name: str, params: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a measurement that is not a plain training run, through the store.

        ``name`` and ``params`` (JSON-able) identify it; ``fn`` returns a JSON-able dict.
        """
        key = run_key({"experiment": self.experiment_id, "measurement": name}, params, device=self.device)

        def run() -> dict[str, Any]:
            out = dict(fn())
            out.setdefault("status", "ok")
            return out

        return self._through_store(key, run)


class Experiment:
    """Base class. Subclasses set the class attributes and implement the three methods.

    Attributes:
        id: short name of the experiment (also its folder in the report), e.g. ``"bn_speed"``.
        claims: the claim ids it tests, e.g. ``("C01",)``.
        title: one line.
        seed_doc: the seed document(s) the claims come from, e.g. ``"002"``.
        statements: claim id -> the claim as the seed states it.
        rules: claim id -> the decision rule, with its thresholds, written before any data is seen.
        validity: claim id -> the condition under which the experiment's task can show the effect at
            all, stated before it runs; when it fails the verdict is ``inconclusive`` (:meth:`Verdict.invalid`).
        reported: claim ids that are "reported as measured" (or hedged): verdicts from :data:`REPORTED`.
    """

    id: ClassVar[str] = ""
    claims: ClassVar[tuple[str, ...]] = ()
    title: ClassVar[str] = ""
    seed_doc: ClassVar[str] = ""
    statements: ClassVar[dict[str, str]] = {}
    rules: ClassVar[dict[str, str]] = {}
    validity: ClassVar[dict[str, str]] = {}
    reported: ClassVar[tuple[str, ...]] = ()

    #: parameter names that are budgets or generated-data sizes, scaled up on an accelerator
    budget_keys: ClassVar[tuple[str, ...]] = (
        "epochs", "max_steps", "steps", "train_steps", "n_samples", "n_batches", "surface_steps",
    )
    #: how much larger the budgets are on CUDA than on the 2-core CPU the defaults were sized for
    gpu_scale: ClassVar[int] = 4

    def params(self, quick: bool) -> dict[str, Any]:
        """The experiment's settings for the full run or ``--quick`` (JSON-able)."""
        raise NotImplementedError

    def params_for(self, quick: bool, device: str) -> dict[str, Any]:
        """The settings the runner uses: :meth:`params`, made larger by :meth:`scale_up` on CUDA."""
        params = self.params(quick)
        if str(device).startswith("cuda"):
            params = self.scale_up(params, self.gpu_scale)
        return params

    def scale_up(self, params: dict[str, Any], factor: int) -> dict[str, Any]:
        """A larger configuration for a GPU: every budget and generated-data size named in
        :attr:`budget_keys` times ``factor`` (thresholds and grids unchanged). Override for more
        (a larger task, say)."""
        out = dict(params)
        for key in self.budget_keys:
            value = out.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = type(value)(value * factor)
        return out

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        """Gather the data (JSON-able) the verdict and figures are computed from."""
        raise NotImplementedError

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        """One :class:`Verdict` per claim, computed from ``data`` only with the rules in ``rules``."""
        raise NotImplementedError

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        """Matplotlib figures (titles, axis labels with units, legends)."""
        raise NotImplementedError


_EXPERIMENTS: dict[str, type[Experiment]] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator adding an experiment to the registry."""
    if not cls.id or not cls.claims:
        raise ValueError(f"experiment {cls.__name__} must set id and claims")
    missing = [c for c in cls.claims if c not in cls.rules or c not in cls.statements or c not in cls.validity]
    if missing:
        raise ValueError(f"experiment {cls.id!r} has no statement, rule or validity check for claim(s) {', '.join(missing)}")
    if stray := [c for c in cls.reported if c not in cls.claims]:
        raise ValueError(f"experiment {cls.id!r} reports claim(s) it does not test: {', '.join(stray)}")
    if cls.id in _EXPERIMENTS and _EXPERIMENTS[cls.id] is not cls:
        raise ValueError(f"experiment id {cls.id!r} registered twice")
    _EXPERIMENTS[cls.id] = cls
    return cls


def experiments() -> dict[str, type[Experiment]]:
    """All registered experiments, by id, in claim order."""
    from batchlab.experiments import load_all

    load_all()
    return dict(sorted(_EXPERIMENTS.items(), key=lambda kv: (min(kv[1].claims), kv[0])))


@dataclass
class Outcome:
    """One experiment's result as written to ``DIR/<id>/outcome.json``."""

    id: str
    claims: list[str]
    title: str
    status: str  # "ok" or "failed"
    verdicts: list[dict[str, Any]]
    params: dict[str, Any]
    figures: list[str]
    wall_time: float
    trials_run: int
    trials_loaded: int
    quick: bool
    seeds: list[int]
    command: str
    seed_doc: str = ""
    statements: dict[str, str] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    validity: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    #: seconds spent computing the trials behind the verdicts: this run's wall time, or, when a
    #: rerun loads every trial from the store, the computing run's (so a rerun does not erase it)
    compute_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

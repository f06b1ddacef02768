"""Figures from plain result data.

Every function takes plain data (lists, dicts, ``RunResult.to_dict()`` dicts; an object with a
``to_dict()`` method is accepted too), draws on ``ax`` when one is given, and returns the
:class:`matplotlib.figure.Figure`. matplotlib is imported only when a function is called.

Figures are built with ``matplotlib.figure.Figure`` rather than ``pyplot``: no GUI backend is
ever selected (rendering goes through Agg), nothing is registered in pyplot's global list of open
figures, so a sweep that draws hundreds of plots leaks no memory and needs no ``plt.close``.
Jupyter still displays a returned figure inline.

Every figure gets a title, axis labels with units and a legend when it has more than one series.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "AXIS_LABELS",
    "CURVE_X",
    "axis_label",
    "plot_curves",
    "plot_heatmap",
    "plot_histogram",
    "plot_xy",
]

CURVE_X = ("step", "examples", "wall_time", "epoch", "train_time")

# Labels with units for the keys of RunResult.history rows and final metrics.
AXIS_LABELS: dict[str, str] = {
    "step": "optimizer step",
    "examples": "training examples seen",
    "wall_time": "wall-clock time (s)",
    "train_time": "training time (s)",
    "epoch": "epoch (passes over the training set)",
    "val_acc": "validation accuracy (fraction correct)",
    "train_acc": "training accuracy (fraction correct)",
    "val_loss": "validation loss (the task's loss, mean)",
    "train_loss": "training loss (the task's loss, mean)",
    "val_metric": "validation metric (the task's own)",
    "train_metric": "training metric (the task's own)",
    "batch_loss": "mini-batch loss (the task's loss)",
    "lr": "learning rate",
    "batch_size": "batch size (examples)",
}

_FAILED_MARKERS = {"diverged": "X", "oom": "s", "failed": "D"}


def axis_label(key: str) -> str:
    """A label with units for a history/metric key (the key itself when it is unknown)."""
    return AXIS_LABELS.get(key, key.replace("_", " "))


# ------------------------------------------------------------------------------------------ helpers


def _new_axes(ax: Axes | None, figsize: tuple[float, float] = (7.0, 4.5)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _as_dict(run: Any, where: str) -> dict[str, Any]:
    if hasattr(run, "to_dict") and callable(run.to_dict):
        run = run.to_dict()
    if not isinstance(run, Mapping):
        raise TypeError(f"{where} must be a RunResult dict (or have to_dict()), got {type(run).__name__}")
    return dict(run)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _legend(ax: Axes, n_series: int, title: str | None = None) -> None:
    if n_series > 1:
        ax.legend(fontsize="small", ncol=2 if n_series > 8 else 1, title=title, title_fontsize="small")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return str(v)


def varying_config_keys(runs: Sequence[Mapping[str, Any]], limit: int | None = 4) -> list[str]:
    """Config fields whose values differ between ``runs`` (at most ``limit`` of them, in order; None:
    all)."""
    keys: list[str] = []
    for run in runs:
        for k in (run.get("config") or {}):
            if k not in keys:
                keys.append(k)
    varying = [k for k in keys if len({repr((r.get("config") or {}).get(k)) for r in runs}) > 1]
    return varying if limit is None else varying[:limit]


def run_label(run: Mapping[str, Any], label_by: str | Sequence[str] | Callable[[dict], str] | None,
              default: str) -> str:
    """The legend label of one run (see :func:`plot_curves`)."""
    if label_by is None:
        return default
    if callable(label_by):
        return str(label_by(dict(run)))
    names = [label_by] if isinstance(label_by, str) else list(label_by)
    parts = []
    for name in names:
        cfg = run.get("config") or {}
        if name in cfg:
            parts.append(f"{name}={_short(cfg[name])}")
        elif name in run:
            parts.append(_short(run[name]) if name == "task" else f"{name}={_short(run[name])}")
        else:
            parts.append(f"{name}=?")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------ plots


def plot_curves(
    runs: Sequence[Mapping[str, Any] | Any],
    x: str = "step",
    y: str = "val_acc",
    label_by: str | Sequence[str] | Callable[[dict], str] | None = None,
    *,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Learning curves: one line per run, ``y`` against ``x`` from each run's ``history``.

    Runs that did not end ``"ok"`` get a marker on their last point (X diverged, square out of
    memory, diamond failed) and their status in the legend; runs with no usable point are listed
    in a note under the plot instead of silently vanishing.

    Args:
        runs: RunResult dicts (or objects with ``to_dict()``).
        x: one of ``"step"``, ``"examples"``, ``"wall_time"``, ``"epoch"``, ``"train_time"``.
        y: a history key, e.g. ``"val_acc"``, ``"val_loss"``, ``"train_loss"``.
        label_by: how runs are named in the legend: a config field (or top-level key) name, a list
            of them, or a function of the run dict. Default: the config fields that differ
            between the runs (the task name when none differ).
        title: default ``"<y> vs <x>"``.
        logx, logy: logarithmic axes.
        ax: draw here instead of on a new figure.

    Returns:
        The figure.
    """
    if x not in CURVE_X:
        raise ValueError(f"x must be one of {', '.join(CURVE_X)}; got {x!r}")
    if not isinstance(y, str) or not y:
        raise ValueError(f"y must be a history key such as 'val_acc', got {y!r}")
    dicts = [_as_dict(r, f"runs[{i}]") for i, r in enumerate(runs)]
    if not dicts:
        raise ValueError("runs is empty: nothing to plot")
    if label_by is None:
        varying = varying_config_keys(dicts)
        label_by = varying or None
    fig, ax = _new_axes(ax)
    drawn, missing, keys_seen = 0, [], set()
    for i, run in enumerate(dicts):
        label = run_label(run, label_by, default=str(run.get("task", f"run {i}")))
        rows = run.get("history") or []
        for row in rows:
            keys_seen.update(row)
        pts = [(row[x], row[y]) for row in rows if _finite(row.get(x)) and _finite(row.get(y))]
        status = str(run.get("status", "ok"))
        if status != "ok":
            label = f"{label} ({status})"
        if not pts:
            missing.append(label)
            continue
        xs, ys = zip(*pts)
        (line,) = ax.plot(xs, ys, label=label, linewidth=1.6, marker="." if len(xs) < 30 else None)
        if status != "ok":
            ax.plot(xs[-1], ys[-1], linestyle="none", marker=_FAILED_MARKERS.get(status, "o"), markersize=10,
                    color=line.get_color(), markeredgecolor="black")
        drawn += 1
    if drawn == 0 and keys_seen and (x not in keys_seen or y not in keys_seen):
        raise ValueError(
            f"no run has history key {x if x not in keys_seen else y!r}; available: {', '.join(sorted(keys_seen))}"
        )
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.set_title(title or _sentence(f"{axis_label(y).split(' (')[0]} vs {axis_label(x).split(' (')[0]}"))
    ax.grid(True, alpha=0.3)
    if missing:
        ax.text(0.01, 0.01, "no points: " + "; ".join(missing)[:200], transform=ax.transAxes, fontsize="x-small",
                color="dimgray", va="bottom")
    _legend(ax, drawn, title=None)
    return fig


def _series_list(series: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(series, Mapping):
        if "x" in series and "y" in series:  # one series given directly
            return [dict(series)]
        out = []
        for name, s in series.items():
            if not isinstance(s, Mapping):
                raise TypeError(f"series[{name!r}] must be a dict with 'x' and 'y', got {type(s).__name__}")
            out.append({"label": name, **s})
        return out
    return [dict(s) for s in series]


def plot_xy(
    series: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    title: str | None = None,
    *,
    kind: str = "line",
    ax: Axes | None = None,
) -> Figure:
    """Generic line or scatter plot of one or more series, with optional error bars.

    A series is a dict ``{"x": [...], "y": [...], "label": ..., "yerr": [...], "marker": "o"}``;
    ``series`` is a list of those, a dict ``{label: {"x": ..., "y": ...}}``, or one series.
    When an entry of ``y`` is itself a list (repeats, e.g. seeds), the line is the mean and a band
    shows min..max. ``yerr`` (symmetric, or a pair of lists) draws error bars.
    Non-finite y values are skipped (a gap), not plotted as zeros.

    Args:
        series: the data, as above.
        xlabel, ylabel: axis labels; include units, e.g. ``"batch size (examples)"``.
        logx, logy: logarithmic axes.
        title: default ``"<ylabel> vs <xlabel>"``.
        kind: ``"line"`` or ``"scatter"``.
        ax: draw here instead of on a new figure.

    Returns:
        The figure.
    """
    if kind not in ("line", "scatter"):
        raise ValueError(f"kind must be 'line' or 'scatter', got {kind!r}")
    for name, v in (("xlabel", xlabel), ("ylabel", ylabel)):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{name} must be a non-empty string (with units), got {v!r}")
    items = _series_list(series)
    if not items:
        raise ValueError("series is empty: nothing to plot")
    fig, ax = _new_axes(ax)
    for i, s in enumerate(items):
        if "x" not in s or "y" not in s:
            raise ValueError(f"series {i} ({s.get('label', '?')!r}) needs 'x' and 'y', got keys {sorted(s)}")
        xs, ys = list(s["x"]), list(s["y"])
        if len(xs) != len(ys):
            raise ValueError(f"series {s.get('label', i)!r}: x has {len(xs)} values but y has {len(ys)}")
        label = s.get("label")
        mean, lo, hi = [], [], []
        for v in ys:
            vals = [float(u) for u in v if _finite(u)] if isinstance(v, (list, tuple)) else (
                [float(v)] if _finite(v) else [])
            mean.append(sum(vals) / len(vals) if vals else math.nan)
            lo.append(min(vals) if vals else math.nan)
            hi.append(max(vals) if vals else math.nan)
        has_band = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in ys)
        marker = s.get("marker", "o" if kind == "scatter" or len(xs) <= 20 else None)
        if kind == "scatter":
            art = ax.scatter(xs, mean, label=label, marker=marker or "o", s=s.get("size", 28))
            color = art.get_facecolor()[0]
        else:
            (art,) = ax.plot(xs, mean, label=label, marker=marker, linewidth=1.6,
                             linestyle=s.get("linestyle", "-"))
            color = art.get_color()
        if has_band:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
        if s.get("yerr") is not None:
            ax.errorbar(xs, mean, yerr=s["yerr"], fmt="none", ecolor=color, capsize=3, alpha=0.8)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or _sentence(f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0]}"))
    ax.grid(True, alpha=0.3)
    _legend(ax, sum(1 for s in items if s.get("label")))
    return fig


def plot_heatmap(
    matrix: Sequence[Sequence[float]],
    xlabels: Sequence[Any],
    ylabels: Sequence[Any],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar_label: str,
    fmt: str = ".3g",
    annotate: bool | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    ax: Axes | None = None,
) -> Figure:
    """A heat map of ``matrix[row][col]``, rows labelled by ``ylabels`` and columns by ``xlabels``.

    Missing or non-finite cells (a diverged or failed run) are drawn grey and annotated ``"—"``.

    Args:
        matrix: rows of numbers (None/NaN for missing cells).
        xlabels, ylabels: tick labels of the columns and rows.
        title, xlabel, ylabel: texts of the figure; axis labels with units.
        colorbar_label: what the colour means, with units.
        fmt: format of the cell annotations.
        annotate: write the value in each cell (default: when there are at most 150 cells).
        cmap, vmin, vmax: colour map and its range.
        ax: draw here instead of on a new figure.

    Returns:
        The figure.
    """
    import numpy as np

    rows = [list(r) for r in matrix]
    if len(rows) != len(ylabels):
        raise ValueError(f"matrix has {len(rows)} rows but ylabels has {len(ylabels)} labels")
    for i, r in enumerate(rows):
        if len(r) != len(xlabels):
            raise ValueError(f"matrix row {i} has {len(r)} values but xlabels has {len(xlabels)} labels")
    data = np.array([[float(v) if _finite(v) else np.nan for v in r] for r in rows], dtype=float).reshape(
        len(rows), len(xlabels))
    masked = np.ma.masked_invalid(data)
    fig, ax = _new_axes(ax, figsize=(max(4.5, 0.8 * len(xlabels) + 2.5), max(3.5, 0.5 * len(ylabels) + 2.0)))
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad="#d0d0d0")
    im = ax.imshow(masked, cmap=cm, aspect="auto", vmin=vmin, vmax=vmax, origin="upper")
    ax.set_xticks(range(len(xlabels)), [str(v) for v in xlabels], rotation=45 if len(xlabels) > 8 else 0)
    ax.set_yticks(range(len(ylabels)), [str(v) for v in ylabels])
    if annotate is None:
        annotate = data.size <= 150
    if annotate:
        finite = data[np.isfinite(data)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                text = format(v, fmt) if np.isfinite(v) else "—"
                dark = np.isfinite(v) and v < mid
                ax.text(j, i, text, ha="center", va="center", fontsize="small",
                        color="white" if dark and cmap in ("viridis", "magma", "inferno", "plasma", "cividis") else "black")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label(colorbar_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def plot_histogram(
    values: Sequence[float] | Mapping[str, Sequence[float]],
    bins: int | Sequence[float] = 30,
    *,
    title: str,
    xlabel: str,
    ylabel: str = "count",
    density: bool = False,
    logy: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Histogram of one sample, or overlaid histograms of several (``{label: values}``).

    Non-finite values are dropped and their number is noted on the plot.

    Args:
        values: numbers, or a dict of label -> numbers.
        bins: number of bins or their edges (shared by all samples).
        title, xlabel: texts of the figure; ``xlabel`` with units.
        ylabel: default ``"count"`` (``"density"`` when ``density``).
        density: normalize each histogram to unit area.
        logy: logarithmic count axis.
        ax: draw here instead of on a new figure.

    Returns:
        The figure.
    """
    import numpy as np

    groups = dict(values) if isinstance(values, Mapping) else {"": values}
    if not groups:
        raise ValueError("values is empty: nothing to plot")
    if isinstance(bins, int) and bins < 1:
        raise ValueError(f"bins must be a positive integer or a list of edges, got {bins!r}")
    clean = {k: np.array([float(v) for v in vs if _finite(v)], dtype=float) for k, vs in groups.items()}
    dropped = sum(len(list(vs)) for vs in groups.values()) - sum(len(v) for v in clean.values())
    everything = np.concatenate([v for v in clean.values()]) if clean else np.array([])
    if everything.size == 0:
        raise ValueError("values has no finite number to plot")
    edges = np.histogram_bin_edges(everything, bins=bins)
    fig, ax = _new_axes(ax)
    many = len(clean) > 1
    for label, v in clean.items():
        ax.hist(v, bins=edges, alpha=0.55 if many else 0.85, label=label or None, density=density,
                edgecolor="white", linewidth=0.5)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density and ylabel == "count" else ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if dropped:
        ax.text(0.99, 0.98, f"{dropped} non-finite value(s) not shown", transform=ax.transAxes, ha="right",
                va="top", fontsize="x-small", color="dimgray")
    _legend(ax, len(clean) if many else 1)
    return fig


def gamma_histogram(gammas_sparse: list[float], gammas_baseline: list[float] | None, *, sparsity: float,
                    threshold: float | None = None, ax: Any = None) -> Any:
    """Histogram of ``|gamma|`` without and with the L1 term; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    vals = [np.asarray(gammas_sparse)] + ([np.asarray(gammas_baseline)] if gammas_baseline else [])
    hi = max(float(v.max()) for v in vals if v.size) or 1.0
    bins = np.linspace(0, hi * 1.02, 41)
    if gammas_baseline:
        ax.hist(gammas_baseline, bins=bins, alpha=0.6, color="C0", label="trained without L1 (lambda = 0)")
    ax.hist(gammas_sparse, bins=bins, alpha=0.6, color="C3", label=f"sparsity training (lambda = {sparsity:g})")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"prune threshold |gamma| = {threshold:.3g}")
    ax.set_xlabel("|gamma| (BN scale, all layers)")
    ax.set_ylabel("channels")
    ax.set_title("BN scale factors before and after sparsity training")
    ax.legend()
    return fig or ax.figure

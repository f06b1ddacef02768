"""One self-contained HTML page from plain data.

:func:`write_report` writes every figure as a PNG under ``out_dir/figures/`` and a single
``out_dir/index.html`` in which the same images are embedded as base64 ``data:`` URIs and the CSS
is inline: the page references nothing outside itself, so it can be mailed, attached to a CI run
or opened offline. :func:`report_from_dir` builds such a page from a folder of RunResult JSON files
(what ``batchlab report DIR`` runs).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchlab.fileio import atomic_write

__all__ = ["VERDICTS", "Section", "load_results", "report_from_dir", "write_report"]

VERDICTS = ("supported", "refuted", "inconclusive", "observed", "not observed")
_SECTION_KEYS = ("title", "text", "tables", "figures", "verdict", "code", "id")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
         ".gif": "image/gif", ".webp": "image/webp"}


@dataclass
class Section:
    """One section of a report. All fields but ``title`` are optional.

    Attributes:
        title: heading, also the table-of-contents entry.
        text: paragraphs: a string (blank lines separate paragraphs) or a list of strings.
            Markdown-ish: ``**bold**``, ``*italic*``, ```code```, lines starting with ``- `` form
            a list. Everything else is escaped (no raw HTML).
        tables: a table, or a list of them: a list of row dicts (columns in first-seen order), or
            ``{"rows": [...], "columns": [...], "caption": "..."}``.
        figures: a figure or a list of them: a matplotlib Figure, an image path, or
            ``{"figure": Figure | path, "caption": "..."}``.
        verdict: ``"supported"``, ``"refuted"``, ``"inconclusive"``, ``"observed"`` or ``"not observed"``: shown
            as a badge.
        code: a command (or list of commands) shown in a code block, e.g. how to rerun it.
        id: the anchor; default: made from the title.
    """

    title: str
    text: str | Sequence[str] | None = None
    tables: Any = None
    figures: Any = None
    verdict: str | None = None
    code: str | Sequence[str] | None = None
    id: str | None = None


def _as_section(s: Section | Mapping[str, Any], i: int) -> Section:
    if isinstance(s, Section):
        sec = s
    elif isinstance(s, Mapping):
        unknown = sorted(set(s) - set(_SECTION_KEYS))
        if unknown:
            raise ValueError(f"sections[{i}] has unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(_SECTION_KEYS)}")
        if "title" not in s:
            raise ValueError(f"sections[{i}] needs a 'title'")
        sec = Section(**s)
    else:
        raise TypeError(f"sections[{i}] must be a Section or a dict, got {type(s).__name__}")
    if not isinstance(sec.title, str) or not sec.title.strip():
        raise ValueError(f"sections[{i}].title must be a non-empty string, got {sec.title!r}")
    if sec.verdict is not None and sec.verdict not in VERDICTS:
        raise ValueError(f"sections[{i}].verdict must be one of {', '.join(VERDICTS)} or None; got {sec.verdict!r}")
    return sec


# ------------------------------------------------------------------------------------------ text


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", out)
    return out


_BULLET = re.compile(r"^\s*[-*] ")


def _paragraphs(text: str | Sequence[str] | None) -> str:
    if text is None:
        return ""
    chunks = re.split(r"\n\s*\n", text) if isinstance(text, str) else [c for t in text for c in re.split(r"\n\s*\n", t)]
    parts = []
    for chunk in chunks:
        lines = [ln.rstrip() for ln in chunk.strip("\n").splitlines() if ln.strip()]
        if not lines:
            continue
        if all(_BULLET.match(ln) for ln in lines):
            items = "".join("<li>" + _inline(_BULLET.sub("", ln)) + "</li>" for ln in lines)
            parts.append(f"<ul>{items}</ul>")
        else:
            parts.append(f"<p>{_inline(' '.join(ln.strip() for ln in lines))}</p>")
    return "\n".join(parts)


def _slug(title: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    slug, n = base, 2
    while slug in used:
        slug, n = f"{base}-{n}", n + 1
    used.add(slug)
    return slug


# ------------------------------------------------------------------------------------------ tables


def format_value(v: Any) -> str:
    """How a table cell shows a value: 4 significant digits for floats, '—' for None and NaN
    (no value: a rung not reached, a model without BN, a diverged run's loss beside its status)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(format_value(x) for x in v) or "—"
    if isinstance(v, Mapping):
        return json.dumps(v, default=str)
    return str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _table(t: Any, where: str) -> str:
    caption, columns = None, None
    if isinstance(t, Mapping):
        if "rows" not in t:
            raise ValueError(f"{where} must be a list of row dicts or a dict with 'rows', got keys {sorted(t)}")
        rows, columns, caption = list(t["rows"]), t.get("columns"), t.get("caption")
    else:
        rows = list(t)
    for j, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"{where} row {j} must be a dict, got {type(r).__name__}")
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    numeric = {c for c in columns if any(_is_number(r.get(c)) for r in rows)
               and all(_is_number(r.get(c)) or r.get(c) is None for r in rows)}
    head = "".join(f'<th{" class=num" if c in numeric else ""}>{html.escape(str(c))}</th>' for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cls = []
            if c in numeric:
                cls.append("num")
            if c == "status" and isinstance(v, str):
                cls.append(f"status status-{re.sub(r'[^a-z]', '', v.lower())}")
            text = format_value(v)
            attr = f' class="{" ".join(cls)}"' if cls else ""
            long = len(text) > 120
            shown = html.escape(text[:120] + "…" if long else text)
            title = f' title="{html.escape(text[:2000])}"' if long else ""
            cells.append(f"<td{attr}{title}>{shown}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_inline(str(caption))}</caption>" if caption else ""
    if not rows:
        return f'<p class="empty">{cap or "(empty table)"}</p>'
    return (f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


# ------------------------------------------------------------------------------------------ figures


def _figure_bytes(fig: Any, where: str) -> tuple[bytes, str, str]:
    """(image bytes, mime type, file suffix) of a matplotlib figure or an image path."""
    if hasattr(fig, "savefig"):
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
        return buf.getvalue(), "image/png", ".png"
    if isinstance(fig, (str, Path)):
        p = Path(fig)
        if not p.is_file():
            raise ValueError(f"{where}: image file {str(p)!r} does not exist")
        mime = _MIME.get(p.suffix.lower())
        if mime is None:
            raise ValueError(f"{where}: unsupported image type {p.suffix!r} ({p}); use one of {', '.join(_MIME)}")
        data = p.read_bytes()
        if mime == "image/png" and not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"{where}: {p} is not a PNG file")
        return data, mime, p.suffix.lower()
    raise TypeError(f"{where} must be a matplotlib Figure or an image path, got {type(fig).__name__}")


def _listify(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


# ------------------------------------------------------------------------------------------ page


_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --soft:#f6f8fa; --accent:#0b5cad;
        --ok:#1a7f37; --bad:#cf222e; --warn:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; font:16px/1.55 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color:var(--fg);
       background:var(--bg); }
.page { display:grid; grid-template-columns: 200px minmax(0, 1fr); gap:32px; max-width:1280px;
        margin:0 auto; padding:32px 28px 64px; }
nav.toc { position:sticky; top:24px; align-self:start; font-size:14px; border-right:1px solid var(--line);
          padding-right:18px; max-height:calc(100vh - 48px); overflow:auto; }
nav.toc h2 { font-size:12px; text-transform:uppercase; letter-spacing:.08em; color:var(--muted); margin:0 0 8px; }
nav.toc ol { list-style:none; padding:0; margin:0; }
nav.toc li { margin:0 0 6px; }
nav.toc a { color:var(--fg); text-decoration:none; }
nav.toc a:hover { color:var(--accent); text-decoration:underline; }
header h1 { font-size:30px; line-height:1.2; margin:0 0 6px; }
header .meta { color:var(--muted); font-size:14px; margin:0 0 18px; }
section { border-top:1px solid var(--line); padding:22px 0 8px; }
section h2 { font-size:22px; margin:0 0 12px; display:flex; align-items:center; gap:12px; flex-wrap:wrap; }
p { margin:0 0 12px; max-width:80ch; }
ul { margin:0 0 12px; padding-left:22px; max-width:80ch; }
code { font:13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background:var(--soft);
       padding:1px 5px; border-radius:4px; }
pre.cmd { background:#0d1117; color:#e6edf3; padding:12px 16px; border-radius:8px; overflow-x:auto; margin:0 0 14px; }
pre.cmd code { background:none; color:inherit; padding:0; }
.badge { display:inline-block; font-size:12px; font-weight:600; letter-spacing:.04em; text-transform:uppercase;
         padding:3px 9px; border-radius:999px; border:1px solid; vertical-align:middle; }
.badge.supported { color:var(--ok); border-color:var(--ok); background:#dafbe1; }
.badge.refuted { color:var(--bad); border-color:var(--bad); background:#ffebe9; }
.badge.inconclusive { color:var(--warn); border-color:var(--warn); background:#fff8c5; }
.badge.observed, .badge.not-observed { color:#444; border-color:#888; background:#f2f2f2; }
nav.toc .badge { font-size:10px; padding:1px 6px; margin-left:4px; }
figure { margin:6px 0 22px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
figcaption { color:var(--muted); font-size:14px; margin-top:6px; max-width:80ch; }
.table-wrap { overflow-x:auto; margin:0 0 18px; }
table { border-collapse:collapse; font-size:13.5px; }
caption { caption-side:top; text-align:left; color:var(--muted); padding:0 0 6px; }
th, td { border-bottom:1px solid var(--line); padding:5px 9px; text-align:left; vertical-align:top; white-space:nowrap; }
th { background:var(--soft); font-weight:600; position:sticky; top:0; }
th.num, td.num { text-align:right; font-variant-numeric:tabular-nums; }
tbody tr:hover { background:#f0f6fc; }
td.status { font-weight:600; }
td.status-ok { color:var(--ok); }
td.status-diverged, td.status-failed, td.status-oom { color:var(--bad); }
.empty { color:var(--muted); font-style:italic; }
footer { color:var(--muted); font-size:13px; border-top:1px solid var(--line); margin-top:24px; padding-top:12px; }
@media (max-width: 900px) { .page { grid-template-columns:1fr; } nav.toc { position:static; border-right:none;
  border-bottom:1px solid var(--line); padding:0 0 12px; max-height:none; } }
@media print { nav.toc { display:none; } .page { display:block; } }
"""


def write_report(
    out_dir: str | Path,
    title: str,
    sections: Sequence[Section | Mapping[str, Any]],
    *,
    intro: str | Sequence[str] | None = None,
) -> Path:
    """Write ``out_dir/index.html`` (self-contained) and ``out_dir/figures/*.png``.

    Args:
        out_dir: output folder (created). Figures are written to ``out_dir/figures/`` and also
            embedded in the page as base64 data URIs; the CSS is inline, so the page loads nothing.
        title: page title.
        sections: :class:`Section` objects or dicts with the same keys.
        intro: paragraphs shown under the title.

    Returns:
        The path of ``index.html``.
    """
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"title must be a non-empty string, got {title!r}")
    if isinstance(sections, (str, bytes, Mapping)) or not isinstance(sections, Sequence):
        raise TypeError(f"sections must be a list of Section or dicts, got {type(sections).__name__}")
    secs = [_as_section(s, i) for i, s in enumerate(sections)]
    out = Path(out_dir)
    fig_dir = out / "figures"
    pngs: dict[str, bytes] = {}  # written after every input image was read (one may live in fig_dir)

    used: set[str] = {"contents"}
    toc, body = [], []
    n_fig = 0
    for i, sec in enumerate(secs):
        anchor = _slug(sec.id or sec.title, used)
        badge = f' <span class="badge {sec.verdict.replace(" ", "-")}">{sec.verdict}</span>' if sec.verdict else ""
        toc.append(f'<li><a href="#{anchor}">{html.escape(sec.title)}</a>{badge}</li>')
        parts = [f'<section id="{anchor}">', f"<h2>{html.escape(sec.title)}{badge}</h2>", _paragraphs(sec.text)]
        for cmd in _listify(sec.code):
            parts.append(f'<pre class="cmd"><code>{html.escape(str(cmd))}</code></pre>')
        tables = sec.tables
        if tables is not None and (isinstance(tables, Mapping) or (
                isinstance(tables, Sequence) and tables and isinstance(tables[0], Mapping) and "rows" not in tables[0])):
            tables = [tables]  # one table (a dict with rows, or a list of row dicts)
        for j, t in enumerate(_listify(tables)):
            parts.append(_table(t, f"sections[{i}].tables[{j}]"))
        for j, f in enumerate(_listify(sec.figures)):
            caption = None
            if isinstance(f, Mapping):
                if "figure" not in f:
                    raise ValueError(f"sections[{i}].figures[{j}] dict needs a 'figure' key, got keys {sorted(f)}")
                f, caption = f["figure"], f.get("caption")
            data, mime, suffix = _figure_bytes(f, f"sections[{i}].figures[{j}]")
            n_fig += 1
            name = f"fig-{n_fig:02d}-{anchor[:40]}{suffix}"
            pngs[name] = data
            alt = caption or _figure_title(f) or f"{sec.title}, figure {j + 1}"
            uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
            cap = f"<figcaption>{_inline(str(caption))}</figcaption>" if caption else ""
            parts.append(f'<figure><img src="{uri}" alt="{html.escape(str(alt))}" '
                         f'data-file="figures/{name}">{cap}</figure>')
        body.append("\n".join(p for p in parts if p) + "\n</section>")

    fig_dir.mkdir(parents=True, exist_ok=True)
    for stale in fig_dir.glob("fig-*"):  # figures of an earlier report in the same folder
        if stale.name not in pngs and not stale.name.startswith("."):
            stale.unlink(missing_ok=True)  # another process may have removed it already
    for name, data in pngs.items():  # each complete or absent, never half-written
        atomic_write(fig_dir / name, data)

    from batchlab import __version__

    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<div class="page">
<nav class="toc" id="contents"><h2>Contents</h2><ol>
{chr(10).join(toc)}
</ol></nav>
<main>
<header><h1>{html.escape(title)}</h1>
<p class="meta">Generated by batchlab {html.escape(__version__)} on {stamp} &middot; {len(secs)} section(s), {n_fig} figure(s)</p>
{_paragraphs(intro)}
</header>
{chr(10).join(body)}
<footer>Self-contained page: figures are embedded; PNG copies are in <code>figures/</code>.</footer>
</main>
</div>
</body>
</html>
"""
    return atomic_write(out / "index.html", page)


def _figure_title(fig: Any) -> str | None:
    try:
        for ax in fig.get_axes():
            t = ax.get_title()
            if t:
                return str(t)
    except AttributeError:
        pass
    return None


# ------------------------------------------------------------------------------------------ from a folder


def _looks_like_result(d: Any) -> bool:
    """A RunResult dict: ``status`` a string, ``config`` a dict, ``history`` a list of dicts and/or
    ``final`` a dict (what the report reads; anything else is listed as skipped, never a crash)."""
    if not (isinstance(d, dict) and isinstance(d.get("status"), str) and isinstance(d.get("config"), dict)):
        return False
    if "history" not in d and "final" not in d:
        return False
    history, final = d.get("history", []), d.get("final", {})
    return (isinstance(history, list) and all(isinstance(row, dict) for row in history)
            and isinstance(final, dict))


def load_results(run_dir: str | Path) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Read every RunResult JSON file under ``run_dir`` (recursively, sorted by path).

    Returns:
        ``([(name, result dict), ...], [skipped file notes])``. A file holding a list of results
        yields one entry per element. Files that are not JSON or not results are skipped.

    Raises:
        FileNotFoundError / NotADirectoryError: ``run_dir`` is missing or not a folder.
        ValueError: it holds no result JSON (the message lists what was looked at).
    """
    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"run_dir {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"run_dir {str(root)!r} is not a directory")
    # hidden files are not results (batchlab's own .batchlab-command.json marks a folder's owner)
    files = sorted(p for p in root.rglob("*.json")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    results, skipped = [], []
    for p in files:
        rel = p.relative_to(root).as_posix()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skipped.append(f"{rel}: not readable JSON ({e})")
            continue
        items = data if isinstance(data, list) else [data]
        good = [d for d in items if _looks_like_result(d)]
        if not good:
            skipped.append(f"{rel}: not a RunResult (needs 'status' (str), 'config' (dict) and 'history' (list of "
                           "dicts) or 'final' (dict))")
            continue
        stem = rel[: -len(".json")]
        for k, d in enumerate(good):
            results.append((stem if len(good) == 1 else f"{stem}[{k}]", d))
    if not results:
        looked = f"{len(files)} .json file(s)" + (": " + "; ".join(skipped[:5]) if skipped else "")
        raise ValueError(f"run_dir {str(root)!r} holds no RunResult JSON file (looked at {looked})")
    return results, skipped


_SUMMARY_METRICS = ("val_acc", "val_metric", "val_loss", "train_acc", "train_metric", "train_loss")


def _own_metric(runs: Sequence[Mapping[str, Any]]) -> tuple[str, bool | None]:
    """The name and direction of the task's own metric (``val_metric``: a user metric such as MAE), as
    the runs record it in ``extra``; ("metric", None) when they do not say or do not agree."""
    seen = {((r.get("extra") or {}).get("metric"), (r.get("extra") or {}).get("higher_is_better")) for r in runs
            if "val_metric" in (r.get("final") or {})}
    if len(seen) == 1:
        name, higher = next(iter(seen))
        return str(name or "metric"), higher if isinstance(higher, bool) else None
    return "metric", None


def report_from_dir(run_dir: str | Path, out_dir: str | Path | None = None, title: str | None = None) -> Path:
    """Turn a folder of RunResult JSON files into figures and one ``index.html``.

    Figures: validation accuracy and loss against step for all runs (training loss when there is
    no validation loss), accuracy against wall time; a summary table of final metrics, status,
    steps and wall time per run; a list of the runs that did not end ``"ok"`` with their errors.

    Args:
        run_dir: folder searched recursively for ``*.json`` results (e.g. ``batchlab train --out DIR``).
        out_dir: where the report goes; default ``run_dir/report``.
        title: page title; default ``"batchlab report: <folder name>"``.

    Returns:
        The path of ``index.html``.

    Raises:
        FileNotFoundError / NotADirectoryError: ``run_dir`` is missing or not a folder.
        ValueError: ``run_dir`` holds no result JSON.
    """
    from batchlab.report import plots

    results, skipped = load_results(run_dir)
    root = Path(run_dir).resolve()
    out = Path(out_dir) if out_dir is not None else root / "report"
    varying = plots.varying_config_keys([d for _, d in results], limit=None)  # every one: none is hidden
    # order runs by the config values that differ (batch size 16 before 128), then by file name
    results.sort(key=lambda nd: (tuple(_order((nd[1].get("config") or {}).get(k)) for k in varying), nd[0]))
    names = [n for n, _ in results]
    runs = [d for _, d in results]
    # legend: the config fields that differ between runs, else the file names
    named = [{**d, "_file": n} for n, d in results]
    several_tasks = len({str(d.get("task")) for d in runs}) > 1
    label_keys = (["task"] if several_tasks else []) + varying
    label: Any = label_keys if label_keys else (lambda run: str(run["_file"]))
    if label_keys and len({plots.run_label(r, label_keys, "") for r in named}) < len(named):
        label = lambda run: str(run["_file"])  # noqa: E731 - runs the differing fields do not tell apart

    history_keys: set[str] = set()
    for r in runs:
        for row in r.get("history") or []:
            history_keys.update(row)

    n_ok = sum(1 for r in runs if r.get("status") == "ok")
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1
    overview = [
        f"{len(runs)} run(s) read from `{root}`: " + ", ".join(f"{v} {k}" for k, v in sorted(statuses.items())) + ".",
    ]
    metric_name, higher = _own_metric(runs)
    for key, what, up in (("val_acc", "validation accuracy", True), ("val_metric", f"validation {metric_name}", higher)):
        scored = [(r.get("final", {}).get(key), names[i]) for i, r in enumerate(runs)
                  if r.get("status") == "ok" and isinstance(r.get("final", {}).get(key), (int, float))]
        scored = [(v, n) for v, n in scored if math.isfinite(v)]
        if scored and up is not None:
            best_v, best_n = max(scored) if up else min(scored)
            overview.append(f"Best final {what} ({'higher' if up else 'lower'} is better): **{best_v:.4g}** "
                            f"(`{best_n}`).")
            break
    if varying:
        overview.append("Runs differ in: " + ", ".join(f"`{k}`" for k in varying) + ".")

    sections: list[Section] = []
    x = "step" if "step" in history_keys else ("epoch" if "epoch" in history_keys else None)
    figures = []
    if x is not None:
        own = f"Validation {metric_name}" + ("" if higher is None else f" ({'higher' if higher else 'lower'} is better)")
        for y, cap in (("val_acc", "Validation accuracy"), ("val_metric", own), ("val_loss", "Validation loss")):
            if y not in history_keys and y == "val_loss" and "train_loss" in history_keys:
                y, cap = "train_loss", "Training loss"
            if y in history_keys:
                fig = plots.plot_curves(named, x=x, y=y, label_by=label, title=f"{cap} vs {x}",
                                        logy=y.endswith("loss") and _positive(runs, y))
                figures.append({"figure": fig, "caption": f"{cap} of every run against {plots.axis_label(x)}; "
                                "a large marker ends a run that diverged, ran out of memory or failed."})
        if "wall_time" in history_keys and "val_acc" in history_keys:
            fig = plots.plot_curves(named, x="wall_time", y="val_acc", label_by=label,
                                    title="Validation accuracy vs wall-clock time")
            figures.append({"figure": fig, "caption": "The same runs against wall-clock time (evaluation included)."})
    sections.append(Section(
        title="Learning curves", text=overview,
        figures=figures or None,
        tables=None if figures else [{"rows": [], "caption": "No history rows with a step or epoch to plot."}],
    ))

    rows = []
    for name, r in results:
        final = r.get("final") or {}
        cfg = r.get("config") or {}
        row: dict[str, Any] = {"run": name, "task": r.get("task"), "status": r.get("status")}
        for k in ("batch_size", "lr", *[v for v in varying if v not in ("batch_size", "lr")]):
            row[k] = cfg.get(k)
        for k in _SUMMARY_METRICS:
            if any(k in (q.get("final") or {}) for q in runs):
                row[k] = final.get(k)
        row["steps"] = r.get("steps")
        row["examples"] = r.get("examples")
        row["wall time (s)"] = r.get("wall_time")
        rows.append(row)
    own_text = (f" `val_metric` / `train_metric` are the task's own metric ({metric_name}"
                + ("" if higher is None else f", {'higher' if higher else 'lower'} is better") + ")."
                if any(k in row for row in rows for k in ("val_metric", "train_metric")) else "")
    sections.append(Section(title="Summary", text="Final metrics (last evaluation) of each run." + own_text,
                            tables={"rows": rows}))

    bad = [{"run": n, "status": r.get("status"), "failed step": r.get("failed_step"),
            "error": (r.get("error") or "").strip().splitlines()[-1:] or None}
           for n, r in results if r.get("status") != "ok"]
    for b in bad:
        b["error"] = b["error"][0] if b["error"] else None
    if bad:
        sections.append(Section(title="Runs that did not finish", tables={"rows": bad},
                                text=f"{len(bad)} of {len(runs)} run(s) did not end `ok`; "
                                     "the last line of each error is shown."))
    if skipped:
        sections.append(Section(title="Skipped files", text="\n".join(f"- `{s}`" for s in skipped[:50])))
    index = write_report(out, title or f"batchlab report: {root.name}", sections,
                         intro=f"{n_ok} of {len(runs)} run(s) ended ok.")
    return index


def _order(v: Any) -> tuple[int, float, str]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return (0, float(v), "")
    return (1, 0.0, repr(v))


def _positive(runs: Sequence[Mapping[str, Any]], key: str) -> bool:
    vals = [row[key] for r in runs for row in (r.get("history") or []) if isinstance(row.get(key), (int, float))]
    vals = [v for v in vals if math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 20

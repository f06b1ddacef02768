"""The ``batchlab reproduce`` report: built from the ``outcome.json`` files alone (runs nothing)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from batchlab.experiments.base import INVALID_PREFIX, VERDICTS
from batchlab.fileio import atomic_write
from batchlab.report.html import write_report

SEED_FILES = {  # the seed documents (Chinese), described in English so any browser renders them
    "000": "000, blog post 'Choosing the batch size and BatchNorm when training neural networks'",
    "001": "001, blog post 'The effect of Batch_Size on training results'",
    "002": "002, lecture notes 'What to do when a network won't train (5): Batch Normalization'",
    "003": "003, lecture notes (Hung-yi Lee's ML course) 'Batch and momentum'",
    "004": "004, blog collection 'BatchNorm topics'",
}


def load_outcomes(out: str | Path) -> list[dict[str, Any]]:
    """Every readable ``out/*/outcome.json``, in claim order.

    A file that is not a complete outcome (cut short by a crash of an older batchlab, edited by
    hand) is skipped with a warning naming it, so it never stops a later run into the same folder;
    rerunning its experiment rewrites it.
    """
    out = Path(out)
    found = []
    for p in sorted(out.glob("*/outcome.json")):
        try:
            o = json.loads(p.read_text(encoding="utf-8"))
            if not (isinstance(o, dict) and isinstance(o.get("claims"), list) and o["claims"] and "id" in o):
                raise ValueError("not an outcome (needs 'id' and a non-empty 'claims' list)")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            warnings.warn(f"skipping unreadable {p}: {e}; rerun its experiment to rewrite it", stacklevel=2)
            continue
        found.append(o)
    return sorted(found, key=lambda o: (min(o["claims"]), o["id"]))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "never" if v > 0 else "-inf"
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}"
    if isinstance(v, dict) and {"mean", "min", "max"} <= set(v):
        if not v.get("n"):
            return "n/a"
        return f"{_fmt(v['mean'])} [{_fmt(v['min'])} .. {_fmt(v['max'])}] (n={v.get('n')})"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v[:12]) + (" ..." if len(v) > 12 else "")
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in list(v.items())[:12])
    return str(v)


def _seed_docs(code: str) -> str:
    return "; ".join(SEED_FILES.get(c.strip(), c.strip()) for c in code.split(",") if c.strip())


def write_reproduce_report(out: str | Path) -> Path:
    """Write ``out/index.html`` from the outcomes found in ``out``."""
    out = Path(out)
    outcomes = load_outcomes(out)
    summary_rows = []
    sections: list[dict[str, Any]] = []
    for o in outcomes:
        for v in sorted(o["verdicts"], key=lambda v: v["claim"]):
            summary_rows.append({
                "claim": v["claim"], "verdict": v["verdict"], "experiment": o["id"],
                "seeds": len(o["seeds"]), "time (s)": round(o.get("compute_time") or o["wall_time"], 1),
                "trials run / loaded": f"{o['trials_run']} / {o['trials_loaded']}",
                "status": o["status"],
            })
            claim = v["claim"]
            text = [
                f"**Claim** (seed {_seed_docs(o.get('seed_doc', ''))}): {o.get('statements', {}).get(claim, '')}",
                f"**Decision rule** (fixed before the data): {o.get('rules', {}).get(claim, '')}",
                f"**Validity check** (fixed before the data): {o.get('validity', {}).get(claim, 'none stated')}",
                f"**Verdict: {v['verdict']}.** {v['reason']}",
            ]
            if v.get("published"):
                text.append(published_text(v["published"]))
            if o["status"] != "ok":
                text.append(f"**The experiment failed:** ```{(o.get('error') or '').strip().splitlines()[-1][:300]}```")
            effect_rows = [{"quantity": k, "value (mean [min .. max] over seeds)": _fmt(x)} for k, x in v.get("effect", {}).items()]
            sections.append({
                "title": f"{claim}: {o['title']}",
                "id": claim.lower(),
                "verdict": v["verdict"],
                "text": text,
                "tables": [{"rows": effect_rows, "caption": "The numbers behind the verdict"}] if effect_rows else None,
                "figures": [str(out / f) for f in o["figures"]],
                "code": o["command"],
            })
    counts = {k: sum(r["verdict"] == k for r in summary_rows) for k in VERDICTS}
    quick = any(o["quick"] for o in outcomes)
    intro = [
        "Each claim that the seed documents make about batch size and batch normalization, tested by an "
        "experiment on this machine's built-in tasks. Every verdict is computed from the data by the decision "
        "rule shown beside it, written before the experiment ran.",
        f"{len(summary_rows)} claims: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + "." + (" Quick configuration (fewer seeds, smaller budgets)." if quick else ""),
    ]
    sections.insert(0, {"title": "Summary", "tables": [{"rows": summary_rows, "caption": "Verdict per claim"}]})
    return write_report(out, "batchlab reproduce: claims about batch size and BatchNorm, tested", sections, intro=intro)


def published_text(pub: dict[str, Any]) -> str:
    """One paragraph: the published numbers next to the measured ones, and whether the trend agrees."""
    agrees = pub.get("trend_agrees")
    if isinstance(agrees, dict):
        verdict = "; ".join(f"{k}: {'agrees' if v else 'does not agree'}" for k, v in agrees.items())
    else:
        verdict = "agrees" if agrees else "does not agree"
    parts = [f"**Published** ({pub.get('source', '')}): {_fmt(pub.get('published'))}"]
    if pub.get("published_trend"):
        parts.append(f"trend: {pub['published_trend']}")
    parts.append(f"**measured here**: {_fmt(pub.get('measured'))}")
    parts.append(f"**trend {verdict}**")
    return ". ".join(parts) + "."


def _md_cell(text: str, limit: int = 260) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown_table(out: str | Path) -> str:
    """The verdict table of the run in ``out`` as Markdown, generated from its ``outcome.json`` files only.

    One row per claim: verdict, whether the validity check passed, the published trend (where the experiment
    re-derives a published result), and the reason the rule printed. A header line names the configuration,
    seeds and the wall time summed over the experiments.
    """
    outcomes = load_outcomes(out)
    if not outcomes:
        raise ValueError(f"no outcome.json under {out}: run `batchlab reproduce --out {out}` first")
    rows, wall = [], 0.0
    counts = {k: 0 for k in VERDICTS}
    for o in outcomes:
        wall += o.get("compute_time") or o["wall_time"]
        for v in sorted(o["verdicts"], key=lambda v: v["claim"]):
            counts[v["verdict"]] += 1
            valid = ("not checked (the experiment failed)" if o["status"] != "ok" else
                     "failed" if v.get("valid") is False else "passed")
            pub = v.get("published") or {}
            agrees = pub.get("trend_agrees")
            if isinstance(agrees, dict):
                trend = ", ".join(f"{k}: {'yes' if a else 'no'}" for k, a in agrees.items())
            else:
                trend = "" if not pub else ("agrees" if agrees else "does not agree")
            reason = v["reason"][len(INVALID_PREFIX):] if v["reason"].startswith(INVALID_PREFIX) else v["reason"]
            status = "" if o["status"] == "ok" else " (experiment failed)"
            rows.append(f"| {v['claim']} | `{o['id']}` | **{v['verdict']}**{status} | {valid} | {trend} | "
                        f"{_md_cell(reason)} |")
    quick = any(o["quick"] for o in outcomes)
    seeds = sorted({len(o["seeds"]) for o in outcomes})
    head = (f"Generated by `batchlab reproduce` from `{Path(out)}` ({'--quick' if quick else 'full'} configuration, "
            f"{'/'.join(map(str, seeds))} seeds; experiment time summed: {wall / 60:.1f} min). "
            + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + ".")
    table = ["| claim | experiment | verdict | validity check | published trend | what decided it |",
             "|---|---|---|---|---|---|", *rows]
    return head + "\n\n" + "\n".join(table) + "\n"


def has_block(file: str | Path, block: str) -> bool:
    """Whether ``file`` exists and holds the ``<!-- reproduce:BLOCK:begin/end -->`` markers."""
    file = Path(file)
    if not file.is_file():
        return False
    text = file.read_text()
    return f"<!-- reproduce:{block}:begin -->" in text and f"<!-- reproduce:{block}:end -->" in text


def write_markdown(out: str | Path, file: str | Path, block: str | None = None) -> Path:
    """Write :func:`markdown_table` to ``file``; with ``block``, replace only the text between the lines
    ``<!-- reproduce:BLOCK:begin -->`` and ``<!-- reproduce:BLOCK:end -->`` of an existing file (how
    docs/reproduce.md keeps its generated tables)."""
    file = Path(file)
    table = markdown_table(out)
    if block is None:
        atomic_write(file, table)
        return file
    begin, end = f"<!-- reproduce:{block}:begin -->", f"<!-- reproduce:{block}:end -->"
    if not has_block(file, block):
        raise ValueError(f"{file} has no block {begin} ... {end}")
    text = file.read_text()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write(file, f"{head}{begin}\n{table}{end}{tail}")
    return file


def main(argv: list[str] | None = None) -> int:
    """``python -m batchlab.experiments.report OUT --markdown FILE [--block NAME]``: regenerate a verdict table."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m batchlab.experiments.report", description=main.__doc__)
    p.add_argument("out", help="a `batchlab reproduce --out` folder")
    p.add_argument("--markdown", required=True, help="Markdown file to write (or update, with --block)")
    p.add_argument("--block", default=None, help="replace only the <!-- reproduce:BLOCK:begin/end --> block")
    args = p.parse_args(argv)
    print(write_markdown(args.out, args.markdown, args.block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

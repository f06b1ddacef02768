"""Tests of batchlab.report: plots from plain data and the self-contained HTML page."""

from __future__ import annotations

import base64
import math
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchlab.report import (
    Section,
    load_results,
    plot_curves,
    plot_heatmap,
    plot_histogram,
    plot_xy,
    report_from_dir,
    write_report,
)
from batchlab.train.config import RunResult, TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"
IMG_SRC = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def fake_run(batch_size: int, lr: float, status: str = "ok", steps: int = 30) -> RunResult:
    """A RunResult shaped like fit()'s, with smooth made-up curves."""
    hist = []
    for s in range(0, steps + 1, 5):
        rate = s * lr * batch_size / 400
        row = {"step": s, "epoch": s * batch_size / 1000, "examples": s * batch_size, "wall_time": 0.01 * s,
               "val_acc": 0.1 + 0.8 * (1 - math.exp(-rate)), "val_loss": 2.3 * math.exp(-rate) + 0.05,
               "train_loss": 2.2 * math.exp(-rate) + 0.04}
        if status == "diverged" and s >= steps // 2:
            row.update(val_loss=float("nan"), train_loss=float("inf"), val_acc=0.1)
            hist.append(row)
            break
        hist.append(row)
    return RunResult(task="digits-mlp", config=TrainConfig(batch_size=batch_size, lr=lr, max_steps=steps).to_dict(),
                     status=status, history=hist, final=dict(hist[-1]), wall_time=hist[-1]["wall_time"],
                     steps=hist[-1]["step"], examples=hist[-1]["examples"],
                     error="training loss became inf at step 15" if status == "diverged" else None)


@pytest.fixture
def runs() -> list[dict]:
    return [fake_run(32, 0.05).to_dict(), fake_run(128, 0.1).to_dict(), fake_run(512, 2.0, "diverged").to_dict()]


@pytest.fixture
def run_dir(tmp_path, runs) -> Path:
    d = tmp_path / "runs"
    (d / "sub").mkdir(parents=True)
    for r in runs[:2]:
        (d / f"bs{r['config']['batch_size']}.json").write_text(RunResult.from_dict(r).to_json())
    (d / "sub" / "bs512.json").write_text(RunResult.from_dict(runs[2]).to_json())
    oom = RunResult(task="digits-mlp", config=TrainConfig(batch_size=8192, max_steps=30).to_dict(), status="oom",
                    error="out of memory at step 0 (batch 8192): CUDA out of memory")
    (d / "bs8192.json").write_text(oom.to_json())
    (d / "notes.json").write_text('{"not": "a result"}')
    (d / "broken.json").write_text("{truncated")
    return d


def legend_labels(fig) -> list[str]:
    leg = fig.axes[0].get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


# ------------------------------------------------------------------------------------------ plots


def test_import_is_light():
    code = "import sys, batchlab.report; bad = {'matplotlib', 'torch'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_plot_curves_lines_labels_and_divergence_marker(runs):
    fig = plot_curves(runs, x="step", y="val_acc")
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() == "optimizer step"
    assert ax.get_ylabel() == "validation accuracy (fraction correct)"
    labels = legend_labels(fig)
    assert labels == ["batch_size=32, lr=0.05", "batch_size=128, lr=0.1", "batch_size=512, lr=2 (diverged)"]
    markers = [ln for ln in ax.get_lines() if ln.get_marker() == "X"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [15]
    fig2 = plot_curves([RunResult.from_dict(runs[0])], x="examples", y="val_loss", label_by="lr")
    assert fig2.axes[0].get_xlabel() == "training examples seen" and fig2.axes[0].get_legend() is None
    fig3 = plot_curves(runs, x="wall_time", label_by=lambda r: f"B{r['config']['batch_size']}")
    assert legend_labels(fig3)[0] == "B32" and "(s)" in fig3.axes[0].get_xlabel()


def test_plot_curves_uses_given_axes_and_rejects_bad_input(runs):
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert plot_curves(runs, ax=ax) is fig
    with pytest.raises(ValueError, match="x must be one of step, examples, wall_time, epoch"):
        plot_curves(runs, x="time")
    with pytest.raises(ValueError, match="no run has history key 'grad_norm'; available: .*val_acc"):
        plot_curves(runs, y="grad_norm")
    with pytest.raises(ValueError, match="runs is empty"):
        plot_curves([])
    with pytest.raises(TypeError, match=r"runs\[0\] must be a RunResult dict"):
        plot_curves([3])


def test_plot_xy_band_errorbars_and_log_axes():
    series = {
        "SGD": {"x": [16, 64, 256], "y": [[0.9, 0.92], [0.91, 0.95, 0.93], [float("nan"), 0.7]]},
        "Adam": {"x": [16, 64, 256], "y": [0.93, 0.94, 0.9], "yerr": [0.01, 0.02, 0.01]},
    }
    fig = plot_xy(series, "batch size (examples)", "final validation accuracy (fraction)", logx=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == "Final validation accuracy vs batch size"
    assert legend_labels(fig) == ["SGD", "Adam"]
    sgd = ax.get_lines()[0]
    assert list(sgd.get_ydata()) == pytest.approx([0.91, 0.93, 0.7])  # mean of the finite repeats
    assert any(type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection") for c in ax.collections)
    assert plot_xy([{"x": [1, 2], "y": [3, 4]}], "a (s)", "b (m)", kind="scatter", title="T").axes[0].get_title() == "T"
    with pytest.raises(ValueError, match="x has 2 values but y has 3"):
        plot_xy({"s": {"x": [1, 2], "y": [1, 2, 3]}}, "a", "b")
    with pytest.raises(ValueError, match="xlabel must be a non-empty string"):
        plot_xy({"x": [1], "y": [1]}, "", "b")
    with pytest.raises(ValueError, match="kind must be 'line' or 'scatter'"):
        plot_xy({"x": [1], "y": [1]}, "a", "b", kind="bar")


def test_plot_heatmap_and_histogram():
    fig = plot_heatmap([[0.9, 0.8], [float("nan"), 0.5]], xlabels=[0.1, 1.0], ylabels=[32, 256],
                       title="Accuracy by batch size and LR", xlabel="learning rate", ylabel="batch size (examples)",
                       colorbar_label="validation accuracy (fraction)")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["0.9", "0.8", "—", "0.5"]
    assert fig.axes[1].get_ylabel() == "validation accuracy (fraction)"
    with pytest.raises(ValueError, match="matrix row 1 has 1 values but xlabels has 2"):
        plot_heatmap([[1, 2], [3]], [1, 2], [1, 2], title="t", xlabel="x", ylabel="y", colorbar_label="c")
    fig = plot_histogram({"BN": [0.1, 0.2, 0.2, float("inf")], "GN": [0.3, 0.35]}, bins=5,
                         title="Per-channel variance", xlabel="variance (unitless)")
    ax = fig.axes[0]
    assert legend_labels(fig) == ["BN", "GN"] and ax.get_ylabel() == "count"
    assert any("1 non-finite" in t.get_text() for t in ax.texts)
    with pytest.raises(ValueError, match="no finite number"):
        plot_histogram([float("nan")], title="t", xlabel="x")


# ------------------------------------------------------------------------------------------ html


def check_self_contained(index: Path) -> list[bytes]:
    """Assert the page loads nothing from outside; return the embedded images' bytes."""
    page = index.read_text(encoding="utf-8")
    assert not re.search(r"https?://", page), "the page references an http(s) URL"
    assert "<link" not in page and "<script" not in page and "@import" not in page and "url(" not in page
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith(("data:", "#")), f"external reference {attr[:80]!r}"
    images = [base64.b64decode(b64, validate=True) for b64 in IMG_SRC.findall(page)]
    assert page.count("<img") == len(images)
    assert all(img.startswith(PNG) for img in images)
    return images


def test_write_report_embeds_every_figure(tmp_path, runs):
    png = tmp_path / "external.png"
    plot_xy({"x": [1, 2], "y": [1, 4]}, "x (s)", "y (m)").savefig(png)
    sections = [
        Section(title="Claim 1: large batches generalize worse", verdict="refuted",
                text="Measured on **digits**.\n\n- first point with `code`\n- second <script>alert(1)</script>",
                figures=[plot_curves(runs), {"figure": png, "caption": "a PNG given by path"}],
                tables=[{"batch": 32, "acc": 0.91234567, "status": "ok"}, {"batch": 512, "acc": None, "status": "diverged"}],
                code="batchlab reproduce --claim 1"),
        {"title": "Claim 1: large batches generalize worse", "verdict": "inconclusive",
         "tables": {"rows": [{"a": 1}], "caption": "one table"}, "figures": plot_curves(runs, y="val_loss")},
        {"title": "Notes", "text": ["first paragraph", "second"]},
    ]
    index = write_report(tmp_path / "out", "Batch size claims", sections, intro="What we checked.")
    assert index == tmp_path / "out" / "index.html"
    images = check_self_contained(index)
    files = sorted((tmp_path / "out" / "figures").glob("*.png"))
    assert len(images) == len(files) == 3
    assert sorted(images) == sorted(f.read_bytes() for f in files)  # the PNG copies are the embedded images
    assert png.read_bytes() in images
    page = index.read_text()
    ids = re.findall(r'<section id="([^"]+)"', page)
    assert ids == ["claim-1-large-batches-generalize-worse", "claim-1-large-batches-generalize-worse-2", "notes"]
    assert re.findall(r'<nav class="toc".*?</nav>', page, re.S)[0].count('href="#') == 3
    for verdict in ("refuted", "inconclusive"):
        assert f'<span class="badge {verdict}">{verdict}</span>' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<strong>digits</strong>" in page
    assert "<li>first point with <code>code</code></li>" in page and "0.9123" in page
    assert '<td class="status status-diverged">diverged</td>' in page
    assert "batchlab reproduce --claim 1" in page and "<caption>one table</caption>" in page
    write_report(tmp_path / "out", "Again", sections[2:])  # a rewrite leaves no stale figures behind
    assert not list((tmp_path / "out" / "figures").glob("*.png"))


def test_write_report_rejects_bad_sections(tmp_path):
    with pytest.raises(ValueError, match=r"sections\[0\].verdict must be one of supported, refuted, inconclusive"):
        write_report(tmp_path, "T", [{"title": "a", "verdict": "maybe"}])
    with pytest.raises(ValueError, match=r"sections\[0\] has unknown key\(s\) 'figure'"):
        write_report(tmp_path, "T", [{"title": "a", "figure": None}])
    with pytest.raises(ValueError, match=r"image file .*missing.png.* does not exist"):
        write_report(tmp_path, "T", [{"title": "a", "figures": [tmp_path / "missing.png"]}])
    with pytest.raises(ValueError, match="title must be a non-empty string"):
        write_report(tmp_path, "", [])
    with pytest.raises(TypeError, match="sections must be a list"):
        write_report(tmp_path, "T", {"title": "a"})  # type: ignore[arg-type]


def test_report_from_dir(run_dir):
    index = report_from_dir(run_dir)
    assert index == run_dir / "report" / "index.html"
    images = check_self_contained(index)
    assert len(images) == 3 == len(list((run_dir / "report" / "figures").glob("*.png")))
    page = index.read_text()
    for name in ("bs32", "bs128", "sub/bs512", "bs8192"):
        assert f"<td>{name}</td>" in page
    assert page.index("<td>bs32</td>") < page.index("<td>bs128</td>") < page.index("<td>sub/bs512</td>")
    assert "Runs that did not finish" in page and "CUDA out of memory" in page
    assert "notes.json" in page and "broken.json" in page  # skipped files are listed, not silently ignored
    assert report_from_dir(run_dir, out_dir=run_dir / "again", title="Mine").read_text().count("<img") == 3
    results, skipped = load_results(run_dir)  # the report's own folder adds no results
    assert len(results) == 4 and len(skipped) == 2


def test_report_shows_the_tasks_own_metric_with_its_direction(tmp_path):
    # a regression task scored by MAE (lower is better): fit writes val_metric, and extra names it
    d = tmp_path / "runs"
    d.mkdir()
    for b, mae in ((16, 0.32), (32, 0.31), (64, 0.41)):
        r = fake_run(b, 0.05)
        for row in r.history:
            row.pop("val_acc")
            row["val_metric"] = mae + 1.0 / (1 + row["step"])
        r.final = dict(r.history[-1])
        r.extra = {"metric": "mae", "higher_is_better": False}
        (d / f"bs{b}.json").write_text(r.to_json())
    page = report_from_dir(d).read_text()
    assert "Best final validation mae (lower is better): <strong>0.3423</strong> (<code>bs32</code>)" in page
    assert "<figcaption>Validation mae (lower is better) of every run" in page and ">val_metric</th>" in page


def test_report_from_dir_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_dir '.*nowhere' does not exist"):
        report_from_dir(tmp_path / "nowhere")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        report_from_dir(tmp_path / "file.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds no RunResult JSON file \(looked at 0 .json file\(s\)\)"):
        report_from_dir(empty)
    with pytest.raises(ValueError, match=r"looked at 1 .json file\(s\): file.json: not a RunResult"):
        report_from_dir(tmp_path)


# ------------------------------------------------------------------------------------------ browser

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  var out = document.createElement('div');
  out.id = 'img-probe';
  out.textContent = 'images=' + imgs.length + ' broken=' + broken;
  document.body.appendChild(out);
});
</script>"""


def render_probe(page: Path, tmp_path: Path, extra_html: str = "") -> tuple[int, int]:
    """Load a copy of ``page`` (with the probe script) in headless Chromium; (images, broken)."""
    copy = tmp_path / f"probe-{page.stem}-{len(extra_html)}.html"
    copy.write_text(page.read_text().replace("</body>", extra_html + PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", "--virtual-time-budget=5000", "--dump-dom",
           copy.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    m = re.search(r'<div id="img-probe">images=(\d+) broken=(\d+)</div>', proc.stdout)
    assert m, f"probe not found in dumped DOM (rc={proc.returncode}); stderr tail: {proc.stderr[-800:]}"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.browser
# CI sets BATCHLAB_REQUIRE_BROWSER=1 so that a missing browser fails there instead of skipping.
@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("BATCHLAB_REQUIRE_BROWSER"),
    reason="no chromium binary on PATH (CI installs it: apt-get install -y chromium)",
)
def test_every_image_renders_in_chromium(run_dir, tmp_path):
    index = report_from_dir(run_dir)
    assert render_probe(index, tmp_path) == (3, 0)
    # the probe can fail: a corrupt image is counted as broken
    assert render_probe(index, tmp_path, '<img src="data:image/png;base64,AAAA">') == (4, 1)


def test_rewrite_can_embed_its_own_previous_figures(tmp_path):
    """Images given by path inside out_dir/figures are read before old figures are cleaned up."""
    first = write_report(tmp_path, "T", [{"title": "a", "figures": plot_xy({"x": [1], "y": [1]}, "x (s)", "y (m)")}])
    old = next((tmp_path / "figures").glob("*.png"))
    data = old.read_bytes()
    again = write_report(tmp_path, "T", [{"title": "b", "figures": old}])
    assert again == first and check_self_contained(again) == [data]
    assert [p.name for p in (tmp_path / "figures").glob("*.png")] == ["fig-01-b.png"]


def test_report_from_dir_names_every_differing_setting(tmp_path):
    d = tmp_path / "runs"
    d.mkdir()
    base = fake_run(32, 0.05)
    for i, change in enumerate([{}, {"grad_clip": 1.0}, {"norm": "group"}, {"accumulation": 2}, {"amp": True},
                                {"weight_decay": 1e-4}]):
        r = RunResult.from_dict(base.to_dict())
        r.config = {**r.config, **change}
        (d / f"run{i}.json").write_text(r.to_json())
    page = report_from_dir(d).read_text()
    overview = page[page.index("Runs differ in"):][:300]
    for key in ("grad_clip", "norm", "accumulation", "amp", "weight_decay"):  # not only the first three
        assert f"<code>{key}</code>" in overview, (key, overview)
        assert re.search(rf"<th( class=num)?>{key}</th>", page)  # and a column each in the summary table

"""Figures and a self-contained HTML report from plain result data (JSON dicts, RunResult dicts).

``report`` renders data and runs nothing: it never imports training code, and matplotlib is
imported only when a figure is drawn.
"""

from batchlab.report.html import VERDICTS, Section, load_results, report_from_dir, write_report
from batchlab.report.plots import plot_curves, plot_heatmap, plot_histogram, plot_xy

__all__ = [
    "VERDICTS",
    "Section",
    "load_results",
    "plot_curves",
    "plot_heatmap",
    "plot_histogram",
    "plot_xy",
    "report_from_dir",
    "write_report",
]

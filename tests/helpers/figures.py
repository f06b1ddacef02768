"""Checks shared by the experiment tests: figures a reader can use."""

from __future__ import annotations

from typing import Any


def check_figures(figs: list[Any]) -> None:
    """At least one figure; every visible panel (colorbars aside) has a title and both axis labels.
    Closes the figures."""
    import matplotlib.pyplot as plt

    assert figs, "no figure"
    for fig in figs:
        axes = [a for a in fig.axes if a.axison and a.get_label() != "<colorbar>"]
        assert axes, "a figure without a visible panel"
        for ax in axes:
            assert ax.get_title(), "every panel has a title"
            assert ax.get_xlabel() and ax.get_ylabel(), "every panel has axis labels"
        plt.close(fig)

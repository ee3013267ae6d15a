"""Matplotlib plumbing shared by the experiments' figures: a headless figure, one way to
label and grid an axis, one way to save.

    fig, ax = plots.figure(figsize=(6, 4))
    ax.plot(...)
    plots.label(ax, xlabel="tokens", ylabel="exact match", title="...", ylim=(-0.02, 1.02))
    plots.save(fig, path)

matplotlib is imported on first use (on the Agg backend: no display needed), so importing an
experiment module never pulls it in.
"""

from __future__ import annotations

from typing import Any


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def figure(*args: Any, **kwargs: Any):
  """`matplotlib.pyplot.subplots(*args, **kwargs)` on the Agg backend: `(fig, ax or axes)`."""
  return _pyplot().subplots(*args, **kwargs)


def label(ax, *, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
          ylim: tuple[float, float] | None = None, legend: bool = True,
          legend_size: int | None = None, grid_which: str = "major") -> None:
  """Axis labels, title, y range, legend (if any line is labelled) and a light grid."""
  if xlabel is not None:
    ax.set_xlabel(xlabel)
  if ylabel is not None:
    ax.set_ylabel(ylabel)
  if title is not None:
    ax.set_title(title)
  if ylim is not None:
    ax.set_ylim(*ylim)
  if legend and ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=legend_size)
  ax.grid(True, which=grid_which, alpha=0.3)


def save(fig, path: str, *, dpi: int = 100) -> None:
  """Tight layout, write `path` (the format from its extension), close the figure."""
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  _pyplot().close(fig)

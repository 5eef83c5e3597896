"""Report plots as inline, byte-for-byte deterministic SVG strings (matplotlib, no pyplot state).

``curves`` arguments map a method name to ``(scores, labels)``: ``scores`` a ``(n,)`` float array where
higher means more suspicious, ``labels`` a ``(n,)`` bool array, True = the pair is truly misaligned.
The curves and their conventions (ties, non-finite scores) are :mod:`ecif_fast.apps.metrics`'.
"""
from __future__ import annotations

import hashlib
import io
import re
from contextlib import contextmanager

import numpy as np

from ..apps.metrics import precision_curve, roc_curve

BAD, GOOD = "#c62828", "#2e7d32"      # misaligned / clean, as in the HTML gallery
_RC = {"svg.hashsalt": "ecif-fast-report", "svg.fonttype": "path", "font.size": 9,
       "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False}


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('the HTML report needs matplotlib: pip install "ecif-fast[report]"') from e
    return matplotlib, Figure


@contextmanager
def _figure(width: float, height: float, **subplots):
    """Yield ``(Figure, axes)`` (constrained layout) made outside pyplot, so nothing is registered
    globally; the report's rcParams hold for the whole block and are restored after it."""
    matplotlib, Figure = _matplotlib()
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        yield fig, fig.subplots(**subplots)


def _to_svg(fig) -> str:
    """The figure as an ``<svg ...>...</svg>`` string for inlining in HTML.

    The XML header, doctype and metadata are dropped; element ids get a prefix derived from the
    content, so several plots in one page never share an id.
    """
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    # This rule is global in an HTML page; the report's CSS scopes it to svg elements instead.
    svg = re.sub(r"\s*<style type=\"text/css\">[^<]*</style>", "", svg)
    prefix = "s" + hashlib.sha1(svg.encode()).hexdigest()[:8] + "-"
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', svg)
    svg = re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{prefix}\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}\1)", svg)
    return svg.strip() + "\n"


def _label(text) -> str:
    """Plain-text legend label: no mathtext from '$', no hiding by a leading '_'."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _colours(n: int) -> list:
    matplotlib, _ = _matplotlib()
    cycle = matplotlib.colormaps["tab10"].colors
    return [cycle[i % len(cycle)] for i in range(n)]


def roc_plot(curves: dict) -> str:
    """ROC curve per method with its AUROC in the legend, and the chance diagonal. Returns ``<svg>``."""
    with _figure(5.2, 3.9) as (fig, ax):
        ax.plot([0, 1], [0, 1], ls=":", color="#999999", lw=1, label="chance (0.500)")
        for (name, (scores, labels)), colour in zip(curves.items(), _colours(len(curves))):
            fpr, tpr, auc = roc_curve(scores, labels)
            ax.plot(fpr, tpr, color=colour, lw=1.6, label=_label(f"{name} ({auc:.3f})"))
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (clean pairs flagged)",
               ylabel="true positive rate (misaligned found)", title="ROC (legend: AUROC)")
        ax.legend(loc="lower right", fontsize=8)
        return _to_svg(fig)


def precision_at_k_plot(curves: dict, k_max: int | None = None) -> str:
    """Precision@k against k for each method, up to ``k_max`` (default: all pairs).

    A dashed vertical line marks k = the number of misaligned pairs (precision there = recall), a
    dotted horizontal one the base rate (random ranking). Returns ``<svg>``.
    """
    n_pos_seen, base_rates = [], []
    with _figure(5.2, 3.9) as (fig, ax):
        for (name, (scores, labels)), colour in zip(curves.items(), _colours(len(curves))):
            prec = precision_curve(scores, labels)
            k = min(prec.size, k_max) if k_max is not None else prec.size
            ax.plot(np.arange(1, k + 1), prec[:k], color=colour, lw=1.6, label=_label(name))
            n_pos = int(np.asarray(labels, dtype=bool).sum())
            if n_pos not in n_pos_seen:
                n_pos_seen.append(n_pos)
                base_rates.append(n_pos / max(prec.size, 1))
        shown = [n for n in n_pos_seen if n > 0 and (k_max is None or n <= k_max)]
        for i, n_pos in enumerate(shown):
            ax.axvline(n_pos, ls="--", color="#666666", lw=1,
                       label=f"k = #misaligned ({n_pos})" if i == 0 else None)
        for i, rate in enumerate(sorted(set(base_rates))):
            ax.axhline(rate, ls=":", color="#999999", lw=1,
                       label=f"random ({rate:.2f})" if i == 0 else None)
        ax.set(ylim=(0, 1.02), xlabel="k (top-k flagged pairs)", ylabel="precision@k",
               title="Precision of the top-k flagged pairs")
        ax.set_xlim(left=1)
        ax.legend(loc="upper right", fontsize=8)
        return _to_svg(fig)


def influence_histogram(positive, negative, labels=None, *, bins: int = 40) -> str:
    """Histograms of the positive-role and negative-role influence parts, one panel each.

    Args:
        positive, negative: ``(n,)`` the two parts of each pair's influence (``total = positive +
            negative``). Non-finite values are left out.
        labels: optional ``(n,)`` bool, True = misaligned; then each panel overlays misaligned and
            clean pairs with shared bins.
    Returns:
        ``<svg>``.
    """
    positive = np.asarray(positive, dtype=np.float64).ravel()
    negative = np.asarray(negative, dtype=np.float64).ravel()
    if labels is not None:
        labels = np.asarray(labels, dtype=bool).ravel()
        if not positive.shape == negative.shape == labels.shape:
            raise ValueError(f"positive, negative and labels must have the same length, got "
                             f"{positive.shape}, {negative.shape} and {labels.shape}")
    from matplotlib.ticker import MaxNLocator

    roles = ("positive role (own loss term)", "negative role (in other anchors' softmax)")
    with _figure(10.4, 3.0, ncols=2) as (fig, axes):
        for ax, values, role in zip(axes, (positive, negative), roles):
            finite = np.isfinite(values)
            edges = np.histogram_bin_edges(values[finite], bins=bins) if finite.any() else bins
            if labels is None:
                ax.hist(values[finite], bins=edges, histtype="stepfilled", color="#1f77b4", alpha=0.8)
            else:
                for mask, name, colour in ((~labels, "clean", GOOD), (labels, "misaligned", BAD)):
                    ax.hist(values[finite & mask], bins=edges, histtype="stepfilled", color=colour,
                            alpha=0.5, label=f"{name} ({int((finite & mask).sum())})")
                ax.legend(loc="upper right", fontsize=8)
            ax.axvline(0, color="#444444", lw=0.8)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(title=role, xlabel="influence part", ylabel="pairs")
        return _to_svg(fig)

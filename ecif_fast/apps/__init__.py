"""Applications built on ECIF (docs/math.md §1): valuation, misalignment detection, trace-back, cleaning.

Names are imported on first use (PEP 562), so that :mod:`ecif_fast.apps.metrics` (numpy only, shared with the
report) loads without the engine.
"""
from __future__ import annotations

from ..lazy import lazy_exports

#: public name -> the submodule that defines it
_EXPORTS = {
    "Cleaning": ".cleaning", "clean": ".cleaning",
    "SCORINGS": ".detection", "SCORING_METHODS": ".detection", "Detection": ".detection",
    "baseline_scores": ".detection", "detect_misaligned": ".detection",
    "auroc": ".metrics", "average_precision": ".metrics", "detection_metrics": ".metrics",
    "precision_at_k": ".metrics",
    "PairInfo": ".pairs", "score_table": ".pairs",
    "trace_back": ".traceback", "zero_shot_logits": ".traceback", "zero_shot_losses": ".traceback",
    "value_data": ".valuation",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)

"""Applications built on ECIF (docs/math.md §1): valuation, misalignment detection, trace-back, cleaning."""
from .cleaning import Cleaning, clean
from .detection import SCORINGS, Detection, baseline_scores, detect_misaligned
from .metrics import auroc, average_precision, detection_metrics, precision_at_k
from .pairs import PairInfo, score_table
from .traceback import trace_back, zero_shot_logits, zero_shot_losses
from .valuation import value_data

__all__ = ["Cleaning", "clean", "SCORINGS", "Detection", "baseline_scores", "detect_misaligned", "auroc",
           "average_precision", "detection_metrics", "precision_at_k", "PairInfo", "score_table",
           "trace_back", "zero_shot_logits", "zero_shot_losses", "value_data"]

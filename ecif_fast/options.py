"""The names of the library's fixed choices, in one place and free of torch, so that the command line can offer
them before torch loads. (The solvers are a registry of their own: :mod:`ecif_fast.solvers.registry`.)"""
from __future__ import annotations

#: curvature matrices (docs/math.md §4)
CURVATURES = ("hessian", "gauss-newton")
#: the negative role's term: exact ``−log(1 − P)`` or the first-order ``P`` (docs/math.md §3)
NEGATIVE_TERMS = ("exact", "taylor")
#: optimisers of :func:`ecif_fast.train` (``auto``: Newton for small problems; above, Newton-CG for LinearHeads
#: with a fixed logit scale, L-BFGS for other models)
TRAINING_METHODS = ("auto", "newton", "newton-cg", "lbfgs")
#: detection scoring -> the name of its score in results, tables, reports and the command line
SCORING_METHODS = {"cleaned": "ecif_cleaned", "validation": "ecif", "self": "ecif_self",
                   "combined": "ecif_combined"}
SCORINGS = tuple(SCORING_METHODS)

#: ``LinearHeads.from_features`` / ``ecif-fast train``: the soft normalisation's ε as a fraction of the starting
#: embeddings' median norm (docs/math.md §2.3).
DEFAULT_SOFT_NORM = 0.1

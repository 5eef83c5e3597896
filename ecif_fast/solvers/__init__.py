"""Inverse-curvature solvers: exact (dense Cholesky), CG (matrix-free), low-rank + damping."""
from .cg import CGSolver
from .curvature import CURVATURES, Curvature
from .damping import AUTO_FRACTION, resolve_damping
from .exact import ExactSolver
from .lowrank import LowRankSolver, top_eigenpairs

SOLVERS = ("exact", "cg", "lowrank")

__all__ = ["CGSolver", "Curvature", "CURVATURES", "AUTO_FRACTION", "resolve_damping", "ExactSolver",
           "LowRankSolver", "top_eigenpairs", "SOLVERS"]

"""Inverse-curvature solvers: exact (dense Cholesky), CG (matrix-free), low-rank + damping; the curvature, the
damping rule and the solver registry (docs/math.md §4).

The solver and curvature names are imported on first use (PEP 562): the registry needs only the standard
library, so the command line can list the solvers before torch loads.
"""
from __future__ import annotations

from ..lazy import lazy_exports
from .registry import (CLOSED_FORM_EXACT_MAX_PARAMS, DEFAULT_POLICY, DEFAULT_SOLVER, EXACT_MAX_PARAMS, SOLVERS,
                       Solver, SolverOptions, check_solver, default_solver, register_solver, solver_class, solver_names,
                       unregister_solver)

#: public name -> the submodule that defines it
_EXPORTS = {
    "CGSolver": ".cg",
    "Curvature": ".curvature",
    "CURVATURES": ".curvature",
    "AUTO_FRACTION": ".damping",
    "resolve_damping": ".damping",
    "ExactSolver": ".exact",
    "LowRankSolver": ".lowrank",
    "top_eigenpairs": ".lowrank",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = [*_EXPORTS, "SOLVERS", "Solver", "SolverOptions", "register_solver", "unregister_solver", "solver_class",
           "solver_names", "check_solver", "default_solver", "DEFAULT_SOLVER", "DEFAULT_POLICY", "EXACT_MAX_PARAMS",
           "CLOSED_FORM_EXACT_MAX_PARAMS"]

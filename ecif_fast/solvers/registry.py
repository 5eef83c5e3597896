"""Solver registry: the inverse-curvature solvers by name, and the default choice (docs/math.md §4).

A solver is a :class:`Solver` subclass that declares its ``name`` and builds itself from what the engine has
(:meth:`Solver.from_engine`); the registry maps the name to the class. Adding a solver is one class and one
entry (:func:`register_solver`, or a line in ``_REGISTRY`` for a built-in one). Built-in solvers are entered by
import path and imported on first use: this module needs only the standard library, so the command line can
list the names before torch loads.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ECIFInputError

#: ``ECIF``'s solver when none is given.
DEFAULT_SOLVER = "exact"
#: The default: the dense reference up to this many parameters (a ``P × P`` matrix and an ``O(P³)``
#: factorisation), above it the matrix-free solver.
EXACT_MAX_PARAMS = 4096
#: The same limit when the dense Gauss–Newton matrix has a closed form (:class:`~ecif_fast.LinearHeads`,
#: docs/math.md §4.2): forming it costs GEMMs instead of ``P`` Jacobian products, so only the factorisation
#: (``P³/3``) and memory (three ``P × P`` matrices at the peak, 3.6 GB in float64 here) bound it.
CLOSED_FORM_EXACT_MAX_PARAMS = 12288
MATRIX_FREE_SOLVER = "cg"
DEFAULT_POLICY = (f"{DEFAULT_SOLVER} up to {EXACT_MAX_PARAMS} parameters ({CLOSED_FORM_EXACT_MAX_PARAMS} for "
                  f"linear heads with Gauss–Newton curvature), else {MATRIX_FREE_SOLVER}")


def default_solver(n_params: int, closed_form: bool = False) -> str:
    """The solver for a model of ``n_params`` trained parameters when none is asked for (:data:`DEFAULT_POLICY`);
    ``closed_form``: the dense curvature has a closed form (see :data:`CLOSED_FORM_EXACT_MAX_PARAMS`)."""
    limit = CLOSED_FORM_EXACT_MAX_PARAMS if closed_form else EXACT_MAX_PARAMS
    return DEFAULT_SOLVER if n_params <= limit else MATRIX_FREE_SOLVER


@dataclass(frozen=True)
class SolverOptions:
    """The engine's solver settings (``ECIF(rank=, seed=, cg_tol=, cg_maxiter=)``, already validated); each
    solver reads the fields named in its ``option_names``."""

    rank: int
    seed: int
    cg_tol: float
    cg_maxiter: int | None
    precondition: bool = True  # CG: precondition with a rank-``rank`` spectral factor


class Solver:
    """Base of the solvers of ``H x = b``, ``H = C + δI`` with ``C`` the undamped curvature (docs/math.md §4).

    A subclass sets ``name`` (its registry key), ``needs_dense`` (the engine then forms the dense ``(P, P)``
    curvature once and shares it with ``damping="auto"``) and ``option_names`` (the :class:`SolverOptions`
    fields it reads), and implements :meth:`from_engine` and :meth:`solve`.
    """

    name: ClassVar[str]
    needs_dense: ClassVar[bool] = False
    option_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_engine(cls, curvature, damping: float, dense, options: SolverOptions) -> "Solver":
        """The solver for ``curvature`` (a :class:`~ecif_fast.solvers.Curvature` over ``P`` parameters) and the
        damping δ > 0; ``dense`` is the ``(P, P)`` curvature when ``needs_dense``, else None."""
        raise NotImplementedError

    def solve(self, B):
        """``H⁻¹ B`` for ``B`` of shape ``(P,)`` or ``(P, Q)`` (the result has the shape of ``B``)."""
        raise NotImplementedError

    def summary(self) -> dict:
        """What the solver measured when it was built, for reports (empty when nothing)."""
        return {}

    # -- saving (ECIF.save / ECIF.load, ecif_fast.state): a solver that can be saved overrides both
    def state_dict(self) -> dict:
        """Everything :meth:`from_state_dict` needs to rebuild this solver without a curvature product:
        ``{key: Tensor | int | float | str | bool | None}`` (flat; a nested solver's keys get a ``"name."``
        prefix). The default refuses: a solver not written for saving cannot be saved."""
        raise NotImplementedError(f"solver {getattr(self, 'name', type(self).__name__)!r} "
                                  f"({type(self).__qualname__}) cannot be saved: it does not implement "
                                  "state_dict() / from_state_dict(); refit instead of loading")

    @classmethod
    def from_state_dict(cls, curvature, damping: float, state: dict, options: SolverOptions) -> "Solver":
        """The solver saved by :meth:`state_dict`, for ``curvature`` (rebuilt from the settings, no product
        computed) and the damping δ the state was fitted with. The default refuses (see :meth:`state_dict`)."""
        raise NotImplementedError(f"solver {getattr(cls, 'name', cls.__name__)!r} ({cls.__qualname__}) cannot "
                                  "be loaded: it does not implement from_state_dict(); refit instead of loading")

    def _attribute_state(self, skip=()) -> dict:
        """The instance attributes (except ``skip``) as a :meth:`state_dict`: tensors (detached) and plain
        scalars; any other attribute is refused with a TypeError naming it (so a new attribute is never
        silently left out of a saved state)."""
        import torch

        out = {}
        for key, value in vars(self).items():
            if key in skip:
                continue
            if torch.is_tensor(value):
                out[key] = value.detach()
            elif value is None or isinstance(value, (bool, int, float, str)):
                out[key] = value
            else:
                raise TypeError(f"solver {self.name!r} cannot be saved: its attribute {key!r} is a "
                                f"{type(value).__name__}, not a tensor or a plain number / string; extend "
                                f"{type(self).__qualname__}.state_dict()")
        return out

    @classmethod
    def _from_attributes(cls, state: dict, **extra) -> "Solver":
        """An instance with ``state`` (and ``extra``) as its attributes, without running ``__init__``."""
        obj = cls.__new__(cls)
        obj.__dict__.update(state)
        obj.__dict__.update(extra)
        return obj


#: name -> the solver class, or ``"module:Class"`` for a built-in one (imported on first use)
_REGISTRY: dict[str, type[Solver] | str] = {
    "exact": "ecif_fast.solvers.exact:ExactSolver",
    "cg": "ecif_fast.solvers.cg:CGSolver",
    "lowrank": "ecif_fast.solvers.lowrank:LowRankSolver",
}

#: The registered names (a live view of the registry).
SOLVERS = _REGISTRY.keys()


def solver_names() -> tuple[str, ...]:
    """The registered solver names, in registration order."""
    return tuple(_REGISTRY)


def check_solver(name) -> str:
    """``name`` if a solver is registered under it, else :class:`~ecif_fast.ECIFInputError` listing the names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ECIFInputError(f"solver must be one of {list(_REGISTRY)}, got {name!r}")
    return name


def solver_class(name: str) -> type[Solver]:
    """The solver class registered under ``name`` (:class:`~ecif_fast.ECIFInputError` for an unknown name)."""
    entry = _REGISTRY[check_solver(name)]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    return entry


def register_solver(cls: type[Solver], *, replace: bool = False) -> type[Solver]:
    """Register the :class:`Solver` subclass ``cls`` under ``cls.name`` (also as a class decorator); a name
    already taken is refused unless ``replace``. Returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise TypeError(f"a solver must be a subclass of ecif_fast.solvers.Solver, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must declare its registry name as a class attribute `name`")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a solver named {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = cls
    return cls


def unregister_solver(name: str) -> None:
    """Remove the solver registered under ``name``."""
    del _REGISTRY[check_solver(name)]

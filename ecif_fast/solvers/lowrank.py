"""Low-rank + damping factorisation ``H⁻¹ ≈ V (Λ+δ)⁻¹ Vᵀ + (I − VVᵀ)/δ`` reused across queries."""
from __future__ import annotations

import warnings

import torch

from ..errors import NotPositiveDefiniteError
from ..validation import check_int
from .curvature import Curvature
from .exact import check_dense, eigvalsh_or_raise
from .registry import Solver, SolverOptions

#: Warn when the eigendirections left out have eigenvalues of RMS above this fraction of δ: each of them gets
#: ``1/δ`` instead of ``1/(λ+δ)`` in ``H⁻¹``, a relative error of ``λ/δ``.
DROPPED_ERROR_WARN = 0.05


def top_eigenpairs(curvature: Curvature, rank: int, *, oversample: int = 10, iters: int = 4, seed: int = 0,
                   dense: torch.Tensor | None = None):
    """Top-``rank`` eigenpairs (largest magnitude) of the curvature.

    Dense ``eigh`` when the matrix is given or ``rank + oversample >= P``; otherwise randomized subspace
    iteration with ``iters`` power steps (``(iters + 1)·(rank + oversample)`` matrix-vector products),
    deterministic under ``seed``.
    Returns ``(eigenvalues (r,), eigenvectors (P, r))``, ordered by decreasing magnitude.
    """
    P = curvature.size
    dtype = curvature.theta.dtype
    if dense is not None or rank + oversample >= P:
        C = curvature.dense() if dense is None else dense
        lam, vecs = eigvalsh_or_raise(C, curvature.kind, vectors=True)
    else:
        g = torch.Generator().manual_seed(seed)
        Y = curvature.matvec(torch.randn(P, rank + oversample, generator=g, dtype=dtype))
        for _ in range(iters):
            Qm, _ = torch.linalg.qr(check_dense(Y, curvature.kind))
            Y = curvature.matvec(Qm)
        Qm, _ = torch.linalg.qr(check_dense(Y, curvature.kind))
        T = Qm.T @ curvature.matvec(Qm)
        lam, W = eigvalsh_or_raise(0.5 * (T + T.T), curvature.kind, vectors=True)
        vecs = Qm @ W
    order = lam.abs().argsort(descending=True)[:rank]
    return lam[order], vecs[:, order]


def _dropped_moments(curvature: Curvature, vecs: torch.Tensor, probes: int = 32, seed: int = 0):
    """Hutchinson estimates of ``tr(C⊥)`` and ``||C⊥||_F²`` for ``C⊥ = (I − VVᵀ) C (I − VVᵀ)``, the
    curvature outside the kept eigenvectors ``vecs (P, r)`` (Rademacher probes projected out of their span, so the
    noise comes from ``C⊥`` only): ``E[zᵀ C⊥ z] = tr(C⊥)``, ``E[||C⊥ z||²] = tr(C⊥²)``."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randint(0, 2, (curvature.size, probes), generator=g).to(vecs.device, vecs.dtype) * 2 - 1
    Z = Z - vecs @ (vecs.T @ Z)
    W = curvature.matvec(Z)
    W = W - vecs @ (vecs.T @ W)
    return float((Z * W).sum()) / probes, float((W * W).sum()) / probes


class LowRankSolver(Solver):
    """Inverse of ``C + δI`` restricted to the top-``rank`` eigenspace of ``C`` plus ``1/δ`` elsewhere.

    Exact when ``rank = P``. What is left out is measured once: exactly from all eigenvalues when the dense
    matrix is built (``dense`` given or ``rank + oversample >= P``), otherwise by a 32-probe Hutchinson
    estimate on the curvature outside the kept eigenvectors (32 more products with ``C``). Attributes:

    - ``captured``: the fraction of the damped spectrum the approximation reproduces,
      ``1 − ||H − Ĥ||_F² / ||H||_F²`` for ``H = C + δI`` and its approximation ``Ĥ`` (``H − Ĥ`` is the curvature
      left out, so this is ``1 − Σ_dropped λ² / Σ_all (λ + δ)²``; 1 when nothing is left out). A squared norm,
      not a trace: the eigenvalues of an indefinite Hessian cancel in a trace.
    - ``dropped_trace``: ``tr(C) − Σ_top λ_i``, the part set to 0;
    - ``dropped_error``: the RMS of ``λ/δ`` over the ``P − r`` dropped eigenvalues,
      ``sqrt(Σ_dropped λ² / (P − r)) / δ``. A dropped direction gets ``1/δ`` instead of ``1/(λ+δ)`` in
      ``H⁻¹``, a relative error of exactly ``λ/δ``; this is its root mean square, at least the mean of ``|λ|/δ``
      (eigenvalues of either sign count: an indefinite Hessian's can cancel in the trace).
    - ``trace_exact``: whether these are exact or estimated.

    ``remainder``: the curvature assumed outside the kept eigenvectors — ``"damping"`` (0, so ``1/δ`` there: the
    solver's definition above) or ``"mean"`` (their mean eigenvalue ``λ̄ = max(dropped_trace / (P − r), 0)``,
    so ``1/(λ̄ + δ)``: the best isotropic fit of the dropped spectrum, used when the factor preconditions CG and
    for factorised self-influence). The attribute ``rest`` holds ``λ̄`` (0 for ``"damping"``).

    A RuntimeWarning is raised once, at construction, when ``dropped_error > DROPPED_ERROR_WARN`` (5 %) and
    ``warn`` (off when the factor only preconditions CG, whose answer does not depend on it).

    The same factor gives every pair's self-influence without a solve per pair (:meth:`quadratic`).
    """

    name = "lowrank"
    option_names = ("rank", "seed")

    @classmethod
    def from_engine(cls, curvature: Curvature, damping: float, dense: torch.Tensor | None,
                    options: SolverOptions) -> "LowRankSolver":
        return cls(curvature, damping, options.rank, options.seed)

    def __init__(self, curvature: Curvature, damping: float, rank: int = 64, seed: int = 0,
                 dense: torch.Tensor | None = None, oversample: int = 10, warn: bool = True,
                 remainder: str = "damping"):
        rank = check_int(rank, "rank", minimum=1)
        seed = check_int(seed, "seed")
        P = curvature.size
        self.rank = min(rank, P)
        if dense is None and self.rank + oversample >= P:
            dense = curvature.dense()
        self.trace_exact = dense is not None
        if dense is not None:
            lam, vecs = eigvalsh_or_raise(dense, curvature.kind, vectors=True)
            order = lam.abs().argsort(descending=True)
            self.lam, self.vecs = lam[order[:self.rank]], vecs[:, order[:self.rank]]
            rest = lam[order[self.rank:]]
            self.dropped_trace, dropped_sq = float(rest.sum()), float((rest ** 2).sum())
        else:
            self.lam, self.vecs = top_eigenpairs(curvature, self.rank, oversample=oversample, seed=seed)
        if bool((self.lam + damping <= 0).any()):
            lam = float(self.lam.min())
            raise NotPositiveDefiniteError(
                f"damped {curvature.kind} matrix is not positive definite: eigenvalue {lam:.4e} with damping "
                f"{damping:.4e}; increase damping above {-lam:.4e} or use curvature='gauss-newton'")
        self.damping = damping
        if dense is None:
            self.dropped_trace, dropped_sq = _dropped_moments(curvature, self.vecs, seed=seed)
        dropped_sq = max(dropped_sq, 0.0)
        # ||H||_F² = Σ_top (λ+δ)² + Σ_dropped (λ+δ)², the latter from the dropped moments
        energy = (float(((self.lam + damping) ** 2).sum()) + dropped_sq + 2 * damping * self.dropped_trace
                  + (P - self.rank) * damping ** 2)
        self.captured = min(1.0, max(0.0, 1.0 - dropped_sq / energy)) if energy > 0 else 1.0
        self.dropped_error = (dropped_sq / (P - self.rank)) ** 0.5 / damping if self.rank < P else 0.0
        if remainder not in ("damping", "mean"):
            raise ValueError(f"remainder must be 'damping' or 'mean', got {remainder!r}")
        # the curvature assumed outside the kept eigenvectors: 0, or their mean eigenvalue (never below 0)
        self.rest = (max(self.dropped_trace / (P - self.rank), 0.0)
                     if remainder == "mean" and self.rank < P else 0.0)
        if warn and self.dropped_error > DROPPED_ERROR_WARN:
            how = "exact" if self.trace_exact else "Hutchinson estimates"
            off = (f"about {100 * self.dropped_error:.0f} %" if self.dropped_error < 10
                   else f"a factor of about {self.dropped_error:.3g}")
            warnings.warn(
                f"low-rank solver: rank {self.rank} of {P} leaves out {P - self.rank} eigenvalues whose RMS is "
                f"{self.dropped_error:.3g} × the damping δ = {damping:.3g} ({how}), so H⁻¹ is off by {off} (RMS) "
                f"in those directions (warns above {100 * DROPPED_ERROR_WARN:.0f} %; the part kept is "
                f"{100 * self.captured:.1f} % of the damped spectrum, in ||C + δI||_F²); raise rank, or use "
                "solver='cg' or 'exact'", RuntimeWarning, stacklevel=2)

    def summary(self) -> dict:
        """``{"rank", "captured", "dropped_error"}``: what the factorisation keeps and how far off the rest is."""
        return {"rank": self.rank, "captured": self.captured, "dropped_error": self.dropped_error}

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``H⁻¹ B`` for ``B`` of shape ``(P,)`` or ``(P, Q)``."""
        coef = self.vecs.T @ B
        inner = self.vecs @ (coef / (self.lam + self.damping).reshape(-1, *([1] * (B.dim() - 1))))
        return inner + (B - self.vecs @ coef) / (self.rest + self.damping)

    def quadratic(self, G: torch.Tensor) -> torch.Tensor:
        """``(K,)`` ``g_kᵀ Ĥ⁻¹ g_k`` for the rows of ``G (K, P)``: ``Σ_j a_j²/(λ_j + δ) + ||g − V a||²/(λ̄ + δ)``
        with ``a = Vᵀ g`` the projection on the kept eigenvectors and ``λ̄`` the curvature assumed outside them
        (``rest``); the remainder is the exact norm of the part of ``g`` outside them (not ``||g||² − ||a||²``,
        which cancels when the factor holds nearly all of ``g``)."""
        G = G.to(self.vecs.dtype)
        A = G @ self.vecs
        rest = G - A @ self.vecs.T
        return (A * A / (self.lam + self.damping)).sum(1) + (rest * rest).sum(1) / (self.rest + self.damping)

    def state_dict(self) -> dict:
        """``{"lam": (r,), "vecs": (P, r), "damping", "rank", "captured", "dropped_error", "dropped_trace",
        "trace_exact"}`` (see :meth:`Solver.state_dict`)."""
        return self._attribute_state()

    @classmethod
    def from_state_dict(cls, curvature: Curvature, damping: float, state: dict,
                        options: SolverOptions) -> "LowRankSolver":
        """The saved eigenpairs and diagnostics as they were: no curvature product, no eigensolver, no warning."""
        return cls._from_attributes(state, damping=damping)

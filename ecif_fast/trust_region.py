"""Trust-region Newton-CG training (docs/math.md §2.2): the ``method="newton-cg"`` of :func:`ecif_fast.train`.

Each outer iteration minimises the quadratic model of ``R`` at ``θ`` inside a ball ``||p||_M ≤ Δ`` by
preconditioned conjugate gradients (Steihaug–Toint: stop at the boundary or on negative curvature), with
exact Hessian-vector products (forward over reverse). The step is taken when ``R`` falls by at least a small
part of the decrease the model predicted, and ``Δ`` follows that ratio (Nocedal & Wright, Alg. 4.1 and 7.2).

``M`` is block diagonal, one block per trained parameter. For the weight ``(out, in)`` of an ``nn.Linear``
it is ``a·A ⊗ I + δ I`` with ``A = Σ_r w_r x_r x_rᵀ`` the layer's input second moment over all rows ``r``
(``w_r = 1/|z_r|²`` for a model that declares normalised embeddings, ``z_r`` the layer's output row: the
normalisation divides the curvature by the squared norm) and ``a`` the block's curvature per unit of ``A``
along a random probe (one Hessian-vector product); any other parameter gets ``a·I + δ I`` the same way.

When the model offers its Gauss–Newton matrix in closed form and it is small enough to factor
(:class:`~ecif_fast.LinearHeads` with both weights trained and a fixed logit scale, docs/math.md §4.2), ``M`` is
that dense matrix plus ``δ I`` instead, factored once per accepted step: it carries the coupling between the
two heads and between the pairs that the block-diagonal ``M`` leaves out (on normalised heads of 512
parameters the block preconditioner had not converged after 400 s, the dense one converges in 47–57 steps of
1–25 CG iterations).

For :class:`~ecif_fast.LinearHeads` whose two weights are trained, every accepted step is followed by an exact
minimisation along the loss's symmetries (docs/math.md §2.2): a joint rotation of both heads leaves every
score unchanged, and so (normalised heads) does a positive rescaling of either head, so only the weight
decay changes there, and its minimum over rotations and scales has a closed form (orthogonal Procrustes).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

#: conjugate-gradient iterations per outer iteration at most.
MAX_CG = 250
#: trace the Hessian-vector product (``torch.func.linearize``, about 2× faster per product, a one-off trace) for
#: an outer iteration after one that took more conjugate-gradient iterations than this.
TRACE_AFTER = 40
#: a step is taken when R falls by at least this part of the predicted decrease.
ACCEPT = 1e-4


@dataclass
class _Block:
    sl: slice
    shape: tuple[int, ...]
    Q: torch.Tensor | None   # eigenvectors of A (Linear weights) or None (scalar block)
    lam: torch.Tensor        # a·eig(A) + δ, or a one-element tensor a + δ


def _hvp(grad_R, theta: torch.Tensor, traced: bool):
    """``v ↦ ∇²R(θ) v`` by forward over reverse; ``traced``: linearised once (falls back when tracing fails)."""
    if traced:
        try:
            with warnings.catch_warnings():   # make_fx's notes on the constants it folds
                warnings.simplefilter("ignore")
                _, lin = torch.func.linearize(grad_R, theta)
            return lin
        except Exception:  # an operation make_fx cannot trace: keep the untraced product
            pass
    return lambda v: torch.func.jvp(grad_R, (theta,), (v,))[1]


def _blocks(space):
    """``(name, slice, shape)`` of every selected parameter in θ."""
    sl = space.slices()
    return [(n, sl[n], tuple(shape)) for n, shape in zip(space.names, space.shapes)]


class Preconditioner:
    """``M`` (see the module docstring): ``apply(v, power)`` returns ``M^power v`` for power ±1."""

    def __init__(self, blocks: list[_Block]):
        self.blocks = blocks

    def apply(self, v: torch.Tensor, power: int) -> torch.Tensor:
        out = torch.empty_like(v)
        for b in self.blocks:
            x = v[b.sl]
            if b.Q is None:
                out[b.sl] = x * b.lam ** power
            else:
                G = x.view(-1, b.Q.shape[0])
                out[b.sl] = (((G @ b.Q) * b.lam ** power) @ b.Q.T).reshape(-1)
        return out


class DensePreconditioner:
    """``M = C + δ I`` for a dense ``(P, P)`` Gauss–Newton matrix ``C``, held as its Cholesky factor."""

    def __init__(self, C: torch.Tensor, delta: float):
        C = 0.5 * (C + C.T)
        top = max(float(C.diagonal().abs().max()), 1e-300)
        C.diagonal().add_(delta if delta > 0 else 1e-10 * top)
        # C is positive semi-definite up to rounding: lift its rounding-level negative eigenvalues if any
        for lift in (0.0, 1e-12, 1e-10, 1e-8, 1e-6):
            if lift:
                C.diagonal().add_(lift * top)
            L, info = torch.linalg.cholesky_ex(C)
            if int(info) == 0:
                break
        else:
            raise torch.linalg.LinAlgError("the Gauss–Newton preconditioner is not positive definite")
        self.L = L

    def apply(self, v: torch.Tensor, power: int) -> torch.Tensor:
        if power == 1:
            return self.L @ (self.L.T @ v)
        return torch.cholesky_solve(v[:, None], self.L)[:, 0]


def linear_inputs(model: nn.Module, space, forward: Callable[[], object], normalized: bool,
                  norm_eps: float = 0.0) -> dict[str, torch.Tensor]:
    """``{param name: A (in, in)}`` for every selected ``nn.Linear`` weight: the input second moment of one
    forward pass, rows weighted by ``1/ρ_r²`` (``ρ² = |z_r|² + norm_eps²``) when ``normalized``."""
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for mname, mod in model.named_modules():
        wname = f"{mname}.weight" if mname else "weight"
        if isinstance(mod, nn.Linear) and wname in space.names:
            def hook(m, args, out, wname=wname):
                x = args[0].detach().reshape(-1, m.in_features)
                w = None
                if normalized:
                    w = 1.0 / (out.detach().reshape(-1, m.out_features).pow(2).sum(1) + norm_eps ** 2).clamp_min(1e-300)
                A = (x * w[:, None]).T @ x if w is not None else x.T @ x
                found[wname] = found[wname] + A if wname in found else A
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return found


def pair_curvature(U: torch.Tensor, V: torch.Tensor, t: float, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_img (n,), c_txt (n,))``: the trace of each embedding's own block of the loss Hessian (docs/math.md
    §2.2), ``t²[Σ_j p_kj|v_j|² − |Σ_j p_kj v_j|² + Σ_j q_jk(1 − q_jk)|v_j|²]`` for image ``k`` (``p``: its row
    softmax, ``q``: the column softmaxes of the texts it is a negative for) and the same with the roles
    swapped; used to weight the rows of a LinearHeads preconditioner."""
    ci, ct = torch.zeros(U.shape[0], dtype=U.dtype), torch.zeros(V.shape[0], dtype=V.dtype)
    for idx in plan.groups():
        u, v = U[idx], V[idx]
        S = t * u @ v.T
        p_row, p_col = torch.softmax(S, dim=1), torch.softmax(S, dim=0)   # p_row[k, j], p_col[k, j]
        nu, nv = (u * u).sum(1), (v * v).sum(1)
        ci[idx] = p_row @ nv - ((p_row @ v) ** 2).sum(1) + (p_col * (1 - p_col)) @ nv
        ct[idx] = p_col.T @ nu - ((p_col.T @ u) ** 2).sum(1) + (p_row * (1 - p_row)).T @ nu
    return t * t * ci, t * t * ct


def build_preconditioner(space, theta: torch.Tensor, moments: dict[str, torch.Tensor], delta: float,
                         hvp: Callable[[torch.Tensor], torch.Tensor], gen: torch.Generator) -> Preconditioner:
    """``M`` at ``theta``: one Hessian-vector product per block sets its curvature scale ``a``."""
    blocks = []
    floor = delta if delta > 0 else 1e-12
    for name, sl, shape in _blocks(space):
        r = torch.randn(sl.stop - sl.start, generator=gen, dtype=theta.dtype).to(theta.device)
        v = torch.zeros_like(theta)
        v[sl] = r
        curv = float(v @ hvp(v)) - delta * float(r @ r)
        if name in moments:
            A = moments[name].to(theta.dtype)
            R = r.view(shape)
            denom = float(((R @ A) * R).sum())
            a = max(curv / denom, 0.0) if denom > 0 else 0.0
            lam, Q = torch.linalg.eigh(A)
            blocks.append(_Block(sl, shape, Q, a * lam.clamp_min(0) + floor))
        else:
            a = max(curv / float(r @ r), 0.0)
            blocks.append(_Block(sl, shape, None, torch.tensor(a + floor, dtype=theta.dtype)))
    return Preconditioner(blocks)


def steihaug(g: torch.Tensor, hvp, M: Preconditioner, radius: float, tol: float, max_cg: int, project=None):
    """``(p, iterations)``: approximate minimiser of ``gᵀp + ½ pᵀHp`` subject to ``||p||_M ≤ radius``; with
    ``project`` (an orthogonal projector), over its range only (preconditioner ``P M⁻¹ P``)."""
    P = project or (lambda v: v)
    z = torch.zeros_like(g)
    r = P(g)
    y = P(M.apply(r, -1))
    d = -y
    ry = float(r @ y)

    def to_boundary(z, d):
        Md = M.apply(d, 1)
        a, b, c = float(d @ Md), 2 * float(z @ Md), float(z @ M.apply(z, 1)) - radius ** 2
        tau = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
        return z + tau * d

    for i in range(max_cg):
        Hd = P(hvp(d))
        dHd = float(d @ Hd)
        if dHd <= 0:
            return to_boundary(z, d), i + 1
        alpha = ry / dHd
        zn = z + alpha * d
        if float(zn @ M.apply(zn, 1)) >= radius ** 2:
            return to_boundary(z, d), i + 1
        z = zn
        r = r + alpha * Hd
        if float(r.norm()) < tol:
            return z, i + 1
        y = P(M.apply(r, -1))
        ry_new = float(r @ y)
        d = -y + (ry_new / ry) * d
        ry = ry_new
    return z, max_cg


def _heads(model: nn.Module, space, theta: torch.Tensor):
    """``(slices, weights as views)`` of LinearHeads' two trained weights, or None."""
    from .models.linear_heads import LinearHeads
    names = ("image_proj.weight", "text_proj.weight")
    if not isinstance(model, LinearHeads) or any(n not in space.names for n in names):
        return None
    sl = {name: (s, shape) for name, s, shape in _blocks(space)}
    return [sl[n][0] for n in names], [theta[sl[n][0]].view(sl[n][1]) for n in names]


def orbit_complement(model: nn.Module, space, theta: torch.Tensor, rotations: bool = True):
    """``v ↦`` the part of ``v`` orthogonal to the symmetry orbit's tangent at ``theta`` (docs/math.md §2.2):
    ``{(S W_img, S W_txt): S skew}`` and, for exactly normalised heads (``scale_invariant``), ``(W_img, 0)`` and
    ``(0, W_txt)``. None when
    the model has no such symmetry. The tangent's rotation part is found from ``skew(K) = (SG + GS)/2`` with
    ``G = Σ W Wᵀ``, ``K = Σ V Wᵀ``, solved in the eigenbasis of ``G``; the scale directions are orthogonal
    to it (``tr(S W Wᵀ) = 0`` for skew ``S``). ``rotations=False``: the scale directions only (None for heads
    that do not normalise)."""
    heads = _heads(model, space, theta)
    if heads is None or not (rotations or model.scale_invariant):
        return None
    sls, W = heads
    if rotations:
        g, E = torch.linalg.eigh(W[0] @ W[0].T + W[1] @ W[1].T)
        den = g[:, None] + g[None, :]
        inv = torch.where(den > 1e-12 * float(g.max()), 2.0 / den.clamp_min(1e-300), torch.zeros_like(den))
    scales = [(sl, w, float((w * w).sum())) for sl, w in zip(sls, W)] if model.scale_invariant else []

    def project(v: torch.Tensor) -> torch.Tensor:
        out = v.clone()
        if rotations:
            V = [v[sl].view(w.shape) for sl, w in zip(sls, W)]
            K = E.T @ (V[0] @ W[0].T + V[1] @ W[1].T) @ E
            S = E @ (0.5 * (K - K.T) * inv) @ E.T
            for sl, w, vv in zip(sls, W, V):
                out[sl] = (vv - S @ w).reshape(-1)
        for sl, w, nn2 in scales:
            if nn2 > 0:
                out[sl] -= (float(out[sl] @ w.reshape(-1)) / nn2) * w.reshape(-1)
        return out
    return project


def head_symmetry_step(model: nn.Module, space, theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """The point of the symmetry orbit of ``theta`` nearest ``ref`` (docs/math.md §2.2), or None when the model
    is not a LinearHeads with both weights trained. Rotation ``Q`` of both heads (orthogonal Procrustes) and,
    for normalised heads, a positive scale per head, alternated to convergence."""
    heads = _heads(model, space, theta)
    if heads is None:
        return None
    sls, W = heads
    Rf = [ref[sl].view(w.shape) for sl, w in zip(sls, W)]
    c = [1.0, 1.0]
    Q = torch.eye(W[0].shape[0], dtype=theta.dtype, device=theta.device)
    for _ in range(50):
        K = c[0] * Rf[0] @ W[0].T + c[1] * Rf[1] @ W[1].T
        U, _, Vh = torch.linalg.svd(K)
        Q = U @ Vh
        if not model.scale_invariant:
            break
        c_new = [max(float((Q @ w * r).sum()) / max(float((w * w).sum()), 1e-300), 1e-3) for w, r in zip(W, Rf)]
        done = max(abs(a - b) for a, b in zip(c, c_new)) < 1e-14
        c = c_new
        if done:
            break
    out = theta.clone()
    for sl, w, ci in zip(sls, W, c):
        out[sl] = (ci * (Q @ w)).reshape(-1)
    return out


def _symmetric_best(R, model, space, theta, ref, f: float, eps: float) -> tuple[torch.Tensor, float, bool]:
    """``(θ, R(θ), moved)``: ``theta`` moved to the nearest point of its symmetry orbit (:func:`head_symmetry_step`)
    unless that would raise ``R`` (``f = R(theta)``) by more than rounding; ``theta`` itself for models without the
    symmetry."""
    sym = head_symmetry_step(model, space, theta, ref)
    if sym is not None:
        f_sym = float(R(sym))
        if f_sym <= f + 64 * eps * abs(f):
            return sym, f_sym, True
    return theta, f, False


def newton_cg(R, grad_R, theta: torch.Tensor, *, model: nn.Module, space, moments: Callable[[torch.Tensor], dict],
              delta: float, ref: torch.Tensor, max_iter: int, tol: float,
              check: Callable[[str, float, torch.Tensor], None],
              dense_curvature: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """Minimise ``R`` from ``theta``; ``(θ, outer iterations)``. ``moments(θ)`` gives the Linear layers'
    input moments at θ; ``check(step, f, g)`` raises when the loss or gradient is not finite.
    ``dense_curvature(θ)``: the ``(P, P)`` Gauss–Newton matrix at θ in θ's order, for :class:`DensePreconditioner`
    (then the steps are projected off the scale directions only: along the rotations ``M`` is ``δ``, as the
    Hessian); the block-diagonal ``M`` takes over if that matrix cannot be factored."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.finfo(theta.dtype).eps
    symmetric = _heads(model, space, theta) is not None
    theta, f0, _ = _symmetric_best(R, model, space, theta, ref, float(R(theta)), eps)
    g = grad_R(theta)            # R and ∇R at theta, kept up to date as theta moves
    radius = M_at = None
    it = last_cg = 0
    while it < max_iter:
        check(f"Newton-CG iteration {it + 1}", f0, g)
        if float(g.abs().max()) < tol:
            break
        it += 1

        hvp = _hvp(grad_R, theta, traced=last_cg > TRACE_AFTER)

        if dense_curvature is not None and M_at is not theta:   # θ moved: refactor (a rejected step keeps M)
            try:
                M, M_at = DensePreconditioner(dense_curvature(theta), delta), theta
            except torch.linalg.LinAlgError:
                dense_curvature = None
        if dense_curvature is None:
            M = build_preconditioner(space, theta, moments(theta), delta, hvp, gen)
        if radius is None:
            radius = math.sqrt(float(g @ M.apply(g, -1)))
        gn = float(g.norm())
        # along a head's scale R is exactly the weight decay's parabola, whose minimum can lie past zero (where
        # every score of that head flips sign): off the dense path steps stay off the whole orbit, on it off
        # the scale directions (the symmetry step sets the scales)
        project = orbit_complement(model, space, theta, rotations=dense_curvature is None) if symmetric else None
        p, last_cg = steihaug(g, hvp, M, radius, min(0.5, math.sqrt(gn)) * gn, MAX_CG, project)
        pred = -(float(g @ p) + 0.5 * float(p @ hvp(p)))
        if not pred > 64 * eps * abs(f0):
            # R cannot resolve the decrease any more; ∇R still can: take the step while it shrinks the gradient
            g_new = grad_R(theta + p)
            if not (pred > 0 and float(g_new.norm()) < gn):
                break
            theta, f0, moved = _symmetric_best(R, model, space, theta + p, ref, float(R(theta + p)), eps)
            g = grad_R(theta) if moved else g_new
            continue
        f1 = float(R(theta + p))
        rho = (f0 - f1) / pred if f1 == f1 else -1.0
        p_norm = math.sqrt(float(p @ M.apply(p, 1)))
        if rho < 0.25:
            radius = 0.25 * p_norm
        elif rho > 0.75 and p_norm > 0.99 * radius:
            radius = 2 * radius
        if rho > ACCEPT:
            theta, f0, _ = _symmetric_best(R, model, space, theta + p, ref, f1, eps)
            g = grad_R(theta)
        if radius < 1e3 * eps * (1 + math.sqrt(float(theta @ M.apply(theta, 1)))):
            break
    return theta, it

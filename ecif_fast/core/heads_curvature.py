"""The dense Gauss–Newton matrix of :class:`~ecif_fast.LinearHeads` in closed form, from Kronecker products
(docs/math.md §4.2), instead of ``P`` Jacobian columns.

For linear heads the Jacobian of the scores has Kronecker rows: ``∂S_ij/∂W_img = t·α_ij ⊗ x̃_i`` and
``∂S_ij/∂W_txt = t·β_ij ⊗ ỹ_j`` with ``α_ij = Π_i v_j``, ``β_ij = Π'_j u_i`` (``Π_i = I − u_i u_iᵀ`` the
normalisation's projection, ``x̃_i = x_i/|W_img x_i|``; ``Π = I`` and ``x̃ = x`` without normalisation). The
score Hessian of a batch is ``H_S = Σ_i (D(p_i) − p_i p_iᵀ) + Σ_j (D(q_j) − q_j q_jᵀ)`` (row and column
softmax), so per batch::

    C = t² [ Σ_ij (p_ij + q_ij) J_ij J_ijᵀ − Σ_i r_i r_iᵀ − Σ_j c_j c_jᵀ ],
    r_i = Σ_j p_ij J_ij,   c_j = Σ_i q_ij J_ij.

The first sum has ``B²`` terms but collapses to ``B`` Kronecker products per diagonal block
(``Σ_i Π_i (Vᵀ D(w_i) V) Π_i ⊗ x̃_i x̃_iᵀ``) and to four GEMMs over the batch for the image–text block (expanding
``α_ij β_ijᵀ`` in ``u_i, v_j`` and ``s_ij = u_i·v_j``); the second is ``2B`` vectors of length ``P``. The cost is
``O(n·P²)`` GEMM work against ``O(n·d·P²)`` for ``Jᵀ(H J)`` by columns.
"""
from __future__ import annotations

import torch

from .normalization import normalized_side
from .pair_norms import structured_norms_blocks

#: Pairs per block of batches whose Kronecker factors are stacked for one GEMM (memory ~ this × P).
PAIRS_PER_GEMM = 4096


def closed_form_blocks(model, names, curvature: str) -> dict | None:
    """The gradient blocks (:func:`~ecif_fast.core.pair_norms.structured_norms_blocks`) when the dense
    ``curvature`` of ``model`` over the parameters ``names`` is built by :func:`heads_gauss_newton` — Gauss–Newton
    of plain :class:`~ecif_fast.LinearHeads` with a projection trained — else None."""
    blocks = structured_norms_blocks(model, names) if curvature == "gauss-newton" else None
    return blocks if blocks is not None and (blocks["image"] or blocks["text"]) else None


def has_closed_form(model, names, curvature: str) -> bool:
    """Whether :func:`closed_form_blocks` applies."""
    return closed_form_blocks(model, names, curvature) is not None


def _project(A: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``Π_i A_i Π_i`` for symmetric ``A (B, d, d)``, ``Π_i = I − u_i u_iᵀ``."""
    Au = torch.einsum("iab,ib->ia", A, u)
    uAu = (Au * u).sum(1)
    return (A - u[:, :, None] * Au[:, None, :] - Au[:, :, None] * u[:, None, :]
            + uAu[:, None, None] * u[:, :, None] * u[:, None, :])


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker products ``(B, p·q)`` of ``a (B, p)`` and ``b (B, q)`` (``a`` index major)."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def _sub_gram(C: torch.Tensor, R: torch.Tensor, width: int = 2048) -> None:
    """``C −= RᵀR`` computing only the blocks on and above the diagonal (half the GEMM work of ``R.T @ R``)."""
    P = R.shape[1]
    for i in range(0, P, width):
        I = slice(i, min(i + width, P))
        for j in range(i, P, width):
            J = slice(j, min(j + width, P))
            G = R[:, I].T @ R[:, J]
            C[I, J] -= G
            if j > i:
                C[J, I] -= G.T


def heads_gauss_newton(Xf: torch.Tensor, Yf: torch.Tensor, W_img: torch.Tensor, W_txt: torch.Tensor,
                       log_scale, groups, *, normalize: bool, image: bool = True, text: bool = True,
                       norm_eps: float = 0.0) -> torch.Tensor:
    """The Gauss–Newton matrix of the summed contrastive loss over the weight blocks of linear heads.

    Args:
        Xf: ``(n, r1)``, Yf: ``(n, r2)``: what the projections multiply (``LinearHeads.proj_input``).
        W_img: ``(d, r1)``, W_txt: ``(d, r2)``. log_scale: ``s`` (``t = exp(s)``), held fixed here.
        groups: the batches, a list of index tensors into the rows of ``Xf, Yf``.
        normalize: the heads L2-normalise (softly with ``norm_eps > 0``). image, text: include the ``W_img`` /
            ``W_txt`` block (at least one).
    Returns:
        ``(P_w, P_w)`` with ``P_w = d·r1·[image] + d·r2·[text]``, rows and columns in the order ``vec(W_img)``
        then ``vec(W_txt)`` (row-major, as ``W.reshape(-1)``), in the dtype of ``Xf``; symmetric up to rounding.
    """
    if not (image or text):
        raise ValueError("heads_gauss_newton needs the image or the text block")
    d, r1 = W_img.shape
    r2 = W_txt.shape[1]
    t = float(torch.as_tensor(log_scale).detach().exp())
    p1, p2 = d * r1 * image, d * r2 * text
    C = Xf.new_zeros(p1 + p2, p1 + p2)
    I_, T_ = slice(0, p1), slice(p1, p1 + p2)
    block: list = []
    pending = 0

    def flush():
        nonlocal block, pending
        if not block:
            return
        cat = {k: torch.cat([b[k] for b in block]) for k in block[0]}
        if image:
            # Σ_i A_i ⊗ x̃_i x̃_iᵀ as (a, b, k, l) → (a, k, b, l)
            C[I_, I_] += (cat["A"].T @ cat["xx"]).reshape(d, d, r1, r1).permute(0, 2, 1, 3).reshape(p1, p1)
        if text:
            C[T_, T_] += (cat["Bm"].T @ cat["yy"]).reshape(d, d, r2, r2).permute(0, 2, 1, 3).reshape(p2, p2)
        if image and text:
            # T1 = Σ_i F_i[b,k] (wG)_i[a,l]: computed as (b,k,a,l), permuted to (a,k,b,l)
            X1 = (cat["F"].T @ cat["wG"]).reshape(d, r1, d, r2).permute(2, 1, 0, 3).reshape(p1, p2)
            X1 += cat["Lft"].T @ cat["Rgt"]
            C[I_, T_] += X1
            C[T_, I_] += X1.T
        _sub_gram(C, cat["R"])
        block, pending = [], 0

    for idx in groups:
        if len(idx) < 2:
            continue
        x, y = Xf[idx], Yf[idx]
        U, Xt = normalized_side(x, W_img, normalize, norm_eps)
        V, Yt = normalized_side(y, W_txt, normalize, norm_eps)
        cos = U @ V.T
        S = t * cos
        Pm, Qm = torch.softmax(S, dim=1), torch.softmax(S, dim=0)
        w = Pm + Qm
        B = len(idx)
        part: dict = {}
        rows, cols = [], []
        F = _outer(U, Xt)                  # u_i ⊗ x̃_i   (B, d·r1)
        G = _outer(V, Yt)                  # v_j ⊗ ỹ_j   (B, d·r2)
        if image:
            A = (w @ _outer(V, V)).reshape(B, d, d)          # Σ_j w_ij v_j v_jᵀ
            part["A"] = (_project(A, U) if normalize else A).reshape(B, d * d)
            part["xx"] = _outer(Xt, Xt)
            PV = Pm @ V
            if normalize:
                PV = PV - U * (U * PV).sum(1, keepdim=True)
            rows.append(_outer(PV, Xt))                     # Π_i (PV)_i ⊗ x̃_i
            c_img = _outer(V, Qm.T @ Xt)                    # v_j ⊗ (Qᵀx̃)_j
            if normalize:
                c_img = c_img - (Qm * cos).T @ F
            cols.append(c_img)
        if text:
            Bm = (w.T @ _outer(U, U)).reshape(B, d, d)      # Σ_i w_ij u_i u_iᵀ
            part["Bm"] = (_project(Bm, V) if normalize else Bm).reshape(B, d * d)
            part["yy"] = _outer(Yt, Yt)
            r_txt = _outer(U, Pm @ Yt)                      # u_i ⊗ (Pỹ)_i
            if normalize:
                r_txt = r_txt - (Pm * cos) @ G
            rows.append(r_txt)
            QU = Qm.T @ U
            if normalize:
                QU = QU - V * (V * QU).sum(1, keepdim=True)
            cols.append(_outer(QU, Yt))                     # Π'_j (QᵀU)_j ⊗ ỹ_j
        if image and text:
            part["F"], part["wG"] = F, w @ G
            if normalize:
                om = w * cos
                # T2 = −Σ_j (v_j ⊗ (ωᵀx̃)_j) G_jᵀ; T3 + T4 = Σ_i F_i ((w∘s²)G − u ⊗ ωỹ)_iᵀ
                part["Lft"] = torch.cat([F, _outer(V, om.T @ Xt)])
                part["Rgt"] = torch.cat([(w * cos * cos) @ G - _outer(U, om @ Yt), -G])
            else:
                part["Lft"], part["Rgt"] = F[:0], G[:0]
        part["R"] = torch.cat([torch.cat(rows, 1), torch.cat(cols, 1)])
        block.append(part)
        pending += B
        if pending >= PAIRS_PER_GEMM:
            flush()
    flush()
    return C.mul_(t * t)

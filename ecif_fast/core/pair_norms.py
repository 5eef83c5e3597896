"""Exact per-pair gradient norms ``||g_k||²`` of :class:`~ecif_fast.LinearHeads` without per-pair gradients
(docs/math.md §4.1).

For linear heads ``u = normalize(W_img x)`` (or ``W_img x``), ``v = normalize(W_txt y)``, ``t = exp(s)``, the
gradient of pair ``k``'s removal term ``ℓ̃_k`` with respect to ``W_img`` is ``t·Y_kᵀ X̃`` with ``X̃ = D(c) X``
(``c_m = 1/|W_img x_m|``, or 1 without normalisation) and ``Y_k = E_k V − D(ρ_k) U`` (``E_k = ∂ℓ̃_k/∂S`` the
``B × B`` score gradient of :func:`~ecif_fast.core.pair_terms.pair_score_gradients`, ``ρ_k[m] = <(E_k V)[m],
u_m>`` the radial part removed by the normalisation, 0 without it). ``E_k`` is not confined to row and column
``k``: an anchor ``i`` that loses ``k`` from its softmax has the whole row ``−w_ik p_i·``. But every pair's
``E_k`` is the same few fixed ``B × B`` matrices scaled by per-pair vectors::

    E_k = e_k a_kᵀ + b_k e_kᵀ + D(y_k) P + Q D(z_k) + (exact weights at line maxima: rank-one terms)

so ``t⁻²||∂ℓ̃_k/∂W||²`` is a sum of quadratic forms ``γᵀ[(Φ Φ'ᵀ) ∘ (Ψ Ψ'ᵀ)]γ'`` and inner products of rank-one
terms, all from ``B × B`` Gram matrices (``X̃ X̃ᵀ``, ``V Vᵀ``, ``U Vᵀ``, ``U Uᵀ``) and ``(K, B) × (B, B)``
products: ``O(B³)`` per batch for all its pairs, ``O(n·B²)`` in all, never ``O(n·P)``. The text side is the same
with ``E_kᵀ`` and the roles of the two towers swapped; a trained logit scale adds ``(Σ E_k ∘ S)²``.

Everything here is plain torch in the ``dtype`` asked for (float64 by default, whatever the model's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .normalization import normalized_side
from .lines import line_weights

#: Parameter names of :class:`~ecif_fast.LinearHeads` that the structured norms know.
HEADS_PARAMS = ("image_proj.weight", "text_proj.weight", "logit_scale")


def structured_norms_blocks(model: nn.Module, names) -> dict | None:
    """Which gradient blocks :func:`heads_pair_sq_norms` must include for ``model`` with the trained parameters
    ``names``, or None when the structured norms do not apply (the model is not a plain
    :class:`~ecif_fast.LinearHeads`, an encoder was overridden or replaced, a projection has a bias, or a trained
    parameter is not one of :data:`HEADS_PARAMS`): then per-pair gradients must be formed.

    Returns ``{"image": bool, "text": bool, "scale": bool, "normalize": bool, "norm_eps": float}``.
    """
    from ..models.linear_heads import LinearHeads

    if not isinstance(model, LinearHeads):
        return None
    cls = type(model)
    if any(getattr(cls, m) is not getattr(LinearHeads, m) for m in ("encode_image", "encode_text", "_embed", "proj_input")):
        return None
    for proj in (model.image_proj, model.text_proj):
        if type(proj) is not nn.Linear or proj.bias is not None:
            return None
    names = set(names)
    if not names <= set(HEADS_PARAMS):
        return None
    return {"image": "image_proj.weight" in names, "text": "text_proj.weight" in names,
            "scale": "logit_scale" in names, "normalize": bool(model.normalize),
            "norm_eps": float(model.norm_eps) if model.normalize else 0.0}


@dataclass
class ScoreGradientTerms:
    """``E_k = ∂ℓ̃_k/∂S`` of the pairs ``ks`` of one batch in structured form (``K = len(ks)``, ``B`` the batch)::

        E_k = e_k row[k]ᵀ + col[k] e_kᵀ + D(y[k]) P + Q D(z[k])
              + Σ_{i: row_owner[i] = k} e_i row_vec[i]ᵀ + Σ_{j: col_owner[j] = k} col_vec[j] e_jᵀ

    Attributes: ``row, col, y, z``: ``(K, B)``; ``P`` (row softmax), ``Q`` (column softmax): ``(B, B)``;
    ``row_idx (Ns,)``, ``row_owner (Ns,)`` (positions in ``ks``), ``row_vec (Ns, B)``: the rows ``i`` whose maximum
    is pair ``k``'s column (exact weights only: ``−p_ik r_i·`` instead of the overflowing ``−w_ik p_i·``);
    ``col_idx, col_owner, col_vec``: the same for columns; ``ks (K,)``. ``col[k][k] = 0`` (the diagonal is in
    ``row``).
    """

    row: torch.Tensor
    col: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    P: torch.Tensor
    Q: torch.Tensor
    row_idx: torch.Tensor
    row_owner: torch.Tensor
    row_vec: torch.Tensor
    col_idx: torch.Tensor
    col_owner: torch.Tensor
    col_vec: torch.Tensor
    ks: torch.Tensor

    def dense(self) -> torch.Tensor:
        """``(K, B, B)`` the matrices ``E_k`` (for tests: ``O(K·B²)`` memory)."""
        K, B = self.row.shape
        a = torch.arange(K)
        E = self.y[:, :, None] * self.P[None] + self.Q[None] * self.z[:, None, :]
        E[self.row_owner, self.row_idx, :] += self.row_vec
        E[self.col_owner, :, self.col_idx] += self.col_vec
        ks = self.ks
        E[a, ks, :] += self.row
        E[a, :, ks] += self.col
        return E


def score_gradient_terms(S: torch.Tensor, exact: bool, ks: torch.Tensor | None = None) -> ScoreGradientTerms:
    """The structured ``E_k`` (:class:`ScoreGradientTerms`) of one ``(B, B)`` score block, equal to
    :func:`~ecif_fast.core.pair_terms.pair_score_gradients` (same safeguards at ``p → 1``, docs/math.md §8)."""
    B = S.shape[0]
    ks = torch.arange(B, device=S.device) if ks is None else ks
    K = ks.numel()
    a = torch.arange(K, device=S.device)
    rw, cw = line_weights(S, exact), line_weights(S.T, exact)
    P, Q = rw.P, cw.P.T
    Wr, Wc = rw.low, cw.low.T          # w_ik at [i, k], w'_kj at [k, j]; 0 on the diagonal (and exact: at maxima)
    y = -Wr[:, ks].T                   # (K, B): y[k][i] = −w_ik
    z = -Wc[ks]                        # (K, B): z[k][j] = −w'_kj
    one = torch.zeros(K, B, dtype=S.dtype, device=S.device)
    one[a, ks] = 1
    Pk, Qk = P[ks], Q[ks]              # row k of P, Q
    Pc, Qc = P[:, ks].T, Q[:, ks].T    # column k of P, Q, as rows
    if exact:  # row k of E_k: p_kj + q_kj − 2δ_jk; column k: p_ik + q_ik − 2δ_ik (pair_terms.py)
        row_target = Pk + Qk - 2 * one
        col_target = Pc + Qc - 2 * one
    else:      # row k: p_kj + w'_kj (1 − q_kj) + δ_jk (q_kk − 2); column k likewise
        qkk, pkk = Q[ks, ks], P[ks, ks]
        row_target = Pk + Wc[ks] * (1 - Qk) + one * (qkk - 2)[:, None]
        col_target = Qc + Wr[:, ks].T * (1 - Pc) + one * (pkk - 2)[:, None]
    # subtract what the dense terms already put in row / column k (the rank-one terms put nothing there)
    row = row_target - Qk * z
    col = col_target - y * Pc
    col[a, ks] = 0
    pos = torch.full((B,), -1, dtype=torch.int64, device=S.device)
    pos[ks] = a
    empty = torch.zeros(0, dtype=torch.int64, device=S.device)
    if exact:
        ri = (rw.special & (pos[rw.arg] >= 0)).nonzero().flatten()
        ci = (cw.special & (pos[cw.arg] >= 0)).nonzero().flatten()
        row_vec = -rw.p_max[ri, None] * rw.rest[ri]
        col_vec = -cw.p_max[ci, None] * cw.rest[ci]
        row_owner, col_owner = pos[rw.arg[ri]], pos[cw.arg[ci]]
    else:
        ri = ci = row_owner = col_owner = empty
        row_vec = col_vec = S.new_zeros(0, B)
    return ScoreGradientTerms(row, col, y, z, P, Q, ri, row_owner, row_vec, ci, col_owner, col_vec, ks)


def _side_sq_norms(Uo, Vo, Xt, ks, row, col, y_row, M_row, M_col, z_col, rsp, csp, normalize: bool):
    """``(K,)`` ``||Y_kᵀ Xt||_F²`` for ``Y_k = E_k Vo − D(ρ_k) Uo`` (docs/math.md §4.1), with

        E_k = e_k row[k]ᵀ + col[k] e_kᵀ + D(y_row[k]) M_row + M_col D(z_col[k])
              + Σ_{rsp} e_i vecᵀ + Σ_{csp} vec e_jᵀ       (rsp, csp: (idx, owner, vec (Ns, B)))

    and ``ρ_k[m] = <(E_k Vo)[m], Uo[m]>`` (0 unless ``normalize``). ``Uo, Vo (B, d)``: this side's and the other
    side's embeddings; ``Xt (B, f)``: this side's features scaled by ``1/|z_m|``.
    """
    K, B = row.shape
    ks_pos = torch.arange(K, device=row.device)
    # diagonal-scaled terms Φᵀ D(γ) Ψ of t⁻¹ ∂ℓ̃_k/∂W (d × f): (Φ (B, d), Ψ (B, f), Γ (K, B))
    terms = [(M_row @ Vo, Xt, y_row), (Vo, M_col.T @ Xt, z_col)]
    if normalize:
        So = Uo @ Vo.T
        rho = row.new_zeros(K, B)
        rho[ks_pos, ks] += (row * So[ks]).sum(1)
        rho += col * So[:, ks].T
        rho += y_row * (M_row * So).sum(1)[None]
        rho += z_col @ (M_col * So).T
        ri, ro, rv = rsp
        rho.index_put_((ro, ri), (rv * So[ri]).sum(1), accumulate=True)
        ci, co, cv = csp
        rho.index_add_(0, co, cv * So[:, ci].T)
        terms.append((Uo, Xt, -rho))
    # rank-one terms φ ⊗ ψ with their owner (position in ks): R1 = (Voᵀ row_k) ⊗ x̃_k, R2 = vo_k ⊗ (Xtᵀ col_k)
    phi1, psi1 = row @ Vo, Xt[ks]
    phi2, psi2 = Vo[ks], col @ Xt
    ri, ro, rv = rsp
    ci, co, cv = csp
    sp_owner = torch.cat([ro, co])
    sp_phi = torch.cat([rv @ Vo, Vo[ci]])
    sp_psi = torch.cat([Xt[ri], cv @ Xt])

    out = row.new_zeros(K)
    # Σ_{c,c'} γ_cᵀ [(Φ_c Φ_c'ᵀ) ∘ (Ψ_c Ψ_c'ᵀ)] γ_c'
    grams: dict = {}

    def gram(A, Bm):
        key = (id(A), id(Bm))
        if key not in grams:
            back = grams.get((id(Bm), id(A)))
            grams[key] = back.T if back is not None else A @ Bm.T
        return grams[key]

    for c, (Fc, Pc, Gc) in enumerate(terms):
        for c2 in range(c, len(terms)):
            F2, P2, G2 = terms[c2]
            H = gram(Fc, F2) * gram(Pc, P2)
            out += (1 if c == c2 else 2) * ((Gc @ H) * G2).sum(1)
        # 2 <Φ_cᵀ D(γ_c) Ψ_c, rank-one terms>
        A1 = phi1 @ Fc.T                        # (K, B)
        B1 = gram(Pc, Xt)[:, ks].T              # Ψ_c x̃_k
        A2 = gram(Fc, Vo)[:, ks].T              # Φ_c vo_k
        B2 = col @ gram(Xt, Pc)                 # Ψ_c (Xtᵀ col_k)
        out += 2 * (Gc * (A1 * B1 + A2 * B2)).sum(1)
        if sp_owner.numel():
            out.index_add_(0, sp_owner, 2 * (Gc[sp_owner] * (sp_phi @ Fc.T) * (sp_psi @ Pc.T)).sum(1))
    # rank-one against rank-one, same owner
    out += (phi1 * phi1).sum(1) * (psi1 * psi1).sum(1) + (phi2 * phi2).sum(1) * (psi2 * psi2).sum(1)
    out += 2 * (phi1 * phi2).sum(1) * (psi1 * psi2).sum(1)
    if sp_owner.numel():
        cross = ((sp_phi * phi1[sp_owner]).sum(1) * (sp_psi * psi1[sp_owner]).sum(1)
                 + (sp_phi * phi2[sp_owner]).sum(1) * (sp_psi * psi2[sp_owner]).sum(1))
        same = (sp_owner[:, None] == sp_owner[None, :]).to(out.dtype)
        pairs = same * (sp_phi @ sp_phi.T) * (sp_psi @ sp_psi.T)
        out.index_add_(0, sp_owner, 2 * cross + pairs.sum(1))
    return out


def heads_pair_sq_norms(X: torch.Tensor, Y: torch.Tensor, W_img: torch.Tensor, W_txt: torch.Tensor,
                        log_scale: torch.Tensor, *, normalize: bool, exact: bool, image: bool = True,
                        text: bool = True, scale: bool = False, ks: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float64, norm_eps: float = 0.0) -> torch.Tensor:
    """``(K,)`` squared norms ``||g_k||²`` of the removal-term gradients of the pairs ``ks`` of ONE batch of
    :class:`~ecif_fast.LinearHeads` (docs/math.md §4.1), over the blocks asked for.

    Args:
        X: ``(B, f_img)``, Y: ``(B, f_txt)`` the batch's input features. W_img: ``(d, f_img)``,
            W_txt: ``(d, f_txt)`` the projections; log_scale: 0-d ``s`` (``t = exp(s)``).
        normalize: the heads L2-normalise the embeddings (softly with ``norm_eps > 0``, docs/math.md §2.3).
            exact: exact (``−log(1−P)``) or taylor negative term.
        image, text, scale: include ``∂/∂W_img``, ``∂/∂W_txt``, ``∂/∂s``.
        ks: ``(K,)`` positions in the batch (default all ``B``). dtype: the arithmetic (float64 by default).
    Returns:
        ``(K,)`` in ``dtype``; equal to ``pair_gradients(...).norm(dim=1)**2`` to the rounding of ``dtype`` times
        the sizes of the terms (``O(B³)`` work for the batch, no ``(K, P)`` gradient).
    """
    X, Y, W_img, W_txt = (x.to(dtype) for x in (X, Y, W_img, W_txt))
    s = log_scale.detach().to(dtype).reshape(())
    t = s.exp()
    B = X.shape[0]
    ks = torch.arange(B, device=X.device) if ks is None else ks.to(X.device)
    U, Xt = normalized_side(X, W_img, normalize, norm_eps)
    V, Yt = normalized_side(Y, W_txt, normalize, norm_eps)
    S = t * (U @ V.T)
    T = score_gradient_terms(S, exact, ks)
    out = S.new_zeros(ks.numel())
    rsp = (T.row_idx, T.row_owner, T.row_vec)
    csp = (T.col_idx, T.col_owner, T.col_vec)
    if image:
        out += t ** 2 * _side_sq_norms(U, V, Xt, ks, T.row, T.col, T.y, T.P, T.Q, T.z, rsp, csp, normalize)
    if text:  # E_kᵀ = e_k colᵀ + row e_kᵀ + D(z) Qᵀ + Pᵀ D(y) + …: rows and columns swapped, the towers too
        out += t ** 2 * _side_sq_norms(V, U, Yt, ks, T.col, T.row, T.z, T.Q.T, T.P.T, T.y, csp, rsp, normalize)
    if scale:
        out += _scale_gradients(T, S, ks) ** 2
    return out


def _scale_gradients(T: ScoreGradientTerms, S: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``(K,)`` ``∂ℓ̃_k/∂s = Σ_ij E_k[i, j] S_ij``."""
    g = (T.row * S[ks]).sum(1) + (T.col * S[:, ks].T).sum(1)
    g += T.y @ (T.P * S).sum(1) + T.z @ (T.Q * S).sum(0)
    if T.row_idx.numel():
        g.index_add_(0, T.row_owner, (T.row_vec * S[T.row_idx]).sum(1))
    if T.col_idx.numel():
        g.index_add_(0, T.col_owner, (T.col_vec * S[:, T.col_idx].T).sum(1))
    return g

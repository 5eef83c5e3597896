"""Row/column softmax of one batch and the negative-role weights of SPEC §4, computed stably."""
from __future__ import annotations

import torch


def removal_weights(S: torch.Tensor, dim: int, exact: bool) -> torch.Tensor:
    """Weights ``w`` of the negative role along ``dim`` of the ``(B, B)`` score block ``S``.

    For ``dim=1`` (rows) the entry ``[i, k]`` is the weight of column ``k`` in row ``i``:
    exact ``p_ik / (1 - p_ik) = exp(S_ik - LSE_{j≠k} S_ij)``, taylor ``p_ik``; ``dim=0`` is the same for
    columns (``q_ki / (1 - q_ki)``). Diagonal entries are set to 0 (a pair is never its own negative).

    Stability (SPEC §3: p → 1): only the row maximum can have ``p > 1/2``; elsewhere
    ``LSE_{j≠k} = L + log1p(-p)`` is accurate, and at the maximum the LSE over the other entries is
    computed directly, so ``1 - p`` never suffers cancellation.
    """
    B = S.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=S.device)
    L = torch.logsumexp(S, dim=dim, keepdim=True)
    logp = S - L
    if not exact:
        return torch.where(eye, torch.zeros_like(S), logp.exp())
    if B == 1:
        return torch.zeros_like(S)
    amax = S.argmax(dim=dim, keepdim=True)
    is_max = torch.zeros_like(S, dtype=torch.bool).scatter_(dim, amax, True)
    lse_wo_max = torch.logsumexp(S.masked_fill(is_max, float("-inf")), dim=dim, keepdim=True)
    # log(1 - p) for the non-maximal entries (p <= 1/2 there, log1p is accurate).
    lse_excl = L + torch.log1p(-logp.exp().clamp(max=0.5))
    lse_excl = torch.where(is_max, lse_wo_max.expand_as(S), lse_excl)
    w = torch.exp(S - lse_excl)
    return torch.where(eye, torch.zeros_like(S), w)


def softmaxes(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax ``p`` and column softmax ``q`` of a ``(B, B)`` score block."""
    return torch.softmax(S, dim=1), torch.softmax(S, dim=0)

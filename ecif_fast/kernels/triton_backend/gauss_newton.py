"""Triton ``gauss_newton_product`` op: the embedding-space Gauss–Newton product (docs/math.md §4).

Per batch, with ``S = t·U Vᵀ``, ``P`` its row softmax, ``Qc`` its column softmax
and, per query ``q``, ``δS = t(δU Vᵀ + U δVᵀ) + δs·S``::

    m_i = Σ_j P_ij δS_ij,   mc_j = Σ_i Qc_ij δS_ij,   G = P∘(δS − m) + Qc∘(δS − mc)
    gU = t·G V,   gV = t·Gᵀ U,   gs = Σ_ij G_ij S_ij

Passes (all through the row-tile kernel of :mod:`.infonce`, each launched twice with the roles of
``U`` and ``V`` swapped; no atomics, deterministic):

1. ``LINE_STATS``: the line statistics ``(top, arg, l = lse − top)`` of the rows and of the columns
   (docs/math.md §8: ``P`` and ``Qc`` must sum to 1 along every line, or ``δS − m`` picks up
   ``eps·|S|·m``).
2. ``GN_MEANS``: ``m`` (row launch) and ``mc`` (swapped launch: the row means of ``δSᵀ`` under the row
   softmax of ``Sᵀ``, i.e. the column means under ``Qc``).
3. ``GN_PRODUCT``: ``gU`` (row launch) and ``gV`` (swapped launch, ``G`` of the swapped problem is
   ``Gᵀ``); per-row ``Σ_j G_ij S_ij`` from the row launch, summed on the host.

Queries are the third grid axis: each program keeps one ``BLOCK_M × BLOCK_D`` accumulator, as in
``infonce``, whatever ``Q`` is, and ``Q`` multiplies the parallelism of small batches. The price is
that ``S`` is recomputed per query (one ``B²d`` product next to the two of ``δS``).

Outputs float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ...core.batches import BatchPlan
from ...core.loss import acc_dtype
from .infonce import GN_MEANS, GN_PRODUCT, run_passes, side_args, stats_launches
from .launch import check_queries, scale_tensor


def gauss_newton_product(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, dU: torch.Tensor,
                         dV: torch.Tensor, dlog_scale=None, *, block_m: Optional[int] = None,
                         block_n: Optional[int] = None, block_d: Optional[int] = None):
    """Gauss–Newton product in embedding space; same contract as the torch twin.

    Args:
        U, V: ``(n, d)`` float16 / bfloat16 / float32 / float64 on a CUDA device (or the CPU with
            ``TRITON_INTERPRET=1``). scale: ``t``. plan: the batches.
        dU, dV: ``(Q, n, d)`` or ``(n, d)`` directions. dlog_scale: ``(Q,)`` / one-element / number, or None.
        block_m, block_n, block_d: tile sizes (powers of two >= 16; ``block_d``: the K step and output
            slice width); testing/tuning knobs.
    Returns:
        ``(gU, gV, gs)``: ``gU, gV`` shaped like ``dU``, ``gs`` ``(Q,)`` (0-d for 2-D directions), zeros
        when ``dlog_scale`` is None; float32 (float64 for float64 inputs) on U's device.
    """
    U, V, dU, dV, ds, squeeze = check_queries(U, V, plan, dU, dV, dlog_scale)
    dev = U.device
    Q, n, d = dU.shape
    acc = acc_dtype(U)
    gU = torch.zeros((Q, n, d), dtype=acc, device=dev)  # the answer when n, d or Q is 0
    gV = torch.zeros((Q, n, d), dtype=acc, device=dev)
    gs = torch.zeros(Q, dtype=acc, device=dev)
    with_ds = ds is not None
    if n and d and Q:
        U, V, dU, dV = U.contiguous(), V.contiguous(), dU.contiguous(), dV.contiguous()
        t = scale_tensor(scale, acc, dev)
        rstats = torch.empty((2, n), dtype=acc, device=dev)  # top and l = lse − top, rows of S
        cstats = torch.empty((2, n), dtype=acc, device=dev)  # the same for the columns
        rarg = torch.empty(n, dtype=torch.int64, device=dev)  # pair index of each line's maximum
        carg = torch.empty(n, dtype=torch.int64, device=dev)
        m = torch.empty((Q, n), dtype=acc, device=dev)
        mc = torch.empty((Q, n), dtype=acc, device=dev)
        gs_rows = torch.empty((Q, n), dtype=acc, device=dev)

        def grid_means(cfg, ntiles):
            return (ntiles, 1, Q)

        def grid_product(cfg, ntiles):
            return (ntiles, triton.cdiv(d, cfg.block_k), Q)

        common = dict(ds_ptr=ds if with_ds else t, scale_ptr=t, n=n, d=d, WITH_DS=with_ds)
        rows_side, cols_side = side_args(U, V, rstats, cstats, rarg, carg, dU, dV)
        launches = stats_launches(U, V, rstats, cstats, rarg, carg, t, n, d) + [
            (grid_means, dict(**rows_side, m_a=t, m_b=t, out=t, row_out=m, MODE=GN_MEANS.value, ROW_TERMS=True,
                              **common)),
            (grid_means, dict(**cols_side, m_a=t, m_b=t, out=t, row_out=mc, MODE=GN_MEANS.value, ROW_TERMS=True,
                              **common)),
            (grid_product, dict(**rows_side, m_a=m, m_b=mc, out=gU, row_out=gs_rows, MODE=GN_PRODUCT.value,
                                ROW_TERMS=True, **common)),
            (grid_product, dict(**cols_side, m_a=mc, m_b=m, out=gV, row_out=t, MODE=GN_PRODUCT.value,
                                ROW_TERMS=False, **common)),
        ]
        run_passes("gauss_newton_product", U, d, plan, launches, directions=True, block_m=block_m,
                   block_n=block_n, block_d=block_d)
        if with_ds:
            gs = gs_rows.sum(1)
    if squeeze:
        return gU[0], gV[0], gs[0]
    return gU, gV, gs

"""The contrastive maths every layer shares (docs/math.md §2–§4, §8): batch plans, the loss, a pair's
removal terms and their score gradients, and the per-line softmax statistics. Depends on torch only; the
kernels in :mod:`ecif_fast.kernels` implement the same quantities as fused ops."""

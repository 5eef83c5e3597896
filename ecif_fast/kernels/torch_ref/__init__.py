"""Pure-torch twins of every op: readable, always available, the oracle for the other backends."""
from .gauss_newton import gauss_newton_product
from .infonce import infonce
from ...core.loss import contrastive_loss
from .lse import lse
from .reductions import ecif_reductions

__all__ = ["lse", "infonce", "contrastive_loss", "ecif_reductions", "gauss_newton_product"]

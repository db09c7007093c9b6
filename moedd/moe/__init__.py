"""The mixture-of-experts parts: the distance-correlation diversity term and mixup fusion."""

from moedd.moe.dcor import dcor2, diversity_term, expert_dcor_loss
from moedd.moe.fusion import MixupFusion

__all__ = ["dcor2", "diversity_term", "expert_dcor_loss", "MixupFusion"]

"""The mixture-of-experts parts: the distance-correlation diversity term and mixup fusion."""

from moedd.moe.dcor import (ESTIMATORS, dcor2, dcor2_bias_corrected, diversity_term, expert_dcor_loss,
                        ranked_diversity_term)
from moedd.moe.fusion import MixupFusion

__all__ = ["ESTIMATORS", "dcor2", "dcor2_bias_corrected", "diversity_term", "expert_dcor_loss", "ranked_diversity_term", "MixupFusion"]

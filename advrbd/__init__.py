"""AdvrBD: adversarial-perturbation-based robust backdoor defense.

Pipeline, one module per step:

* :mod:`advrbd.score`: the robustness (consistency) score, KL(p(x) || p(x + m*delta*)) with a
  random square patch mask per sample and a batched PGD inner maximisation;
* :mod:`advrbd.partition`: Algorithm 1, the lowest-consistency samples of a pool are "assumed clean";
* :mod:`advrbd.enhance`: Algorithm 2, iterative backdoor enhancement (relearn D_p, unlearn D_c);
* :mod:`advrbd.identify`: samples the enhanced model misclassifies are declared clean;
* :mod:`advrbd.defense`: the :class:`~defenses.Defense` gluing these together, plus the clean
  model, relabel and relearn, registered as the defense ``advrbd``.
"""
from .defense import AdvrBD
from .enhance import (
           EnhanceConfig,
           Observer,
           enhance,
           joint_epoch,
           relearn_phase,
           unlearn_phase,
)
from .identify import identify
from .partition import partition
from .score import ScoreConfig, calibrate_eps, patch_masks, pgd_patch, robustness_scores

__all__ = ["AdvrBD", "EnhanceConfig", "Observer", "ScoreConfig", "calibrate_eps", "enhance", "identify", "joint_epoch",
           "partition", "patch_masks", "pgd_patch", "relearn_phase", "robustness_scores", "unlearn_phase"]

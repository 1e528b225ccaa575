"""promptreg-jax: PromptReg universal 3D registration in JAX/Flax.

Conventions (see ``promptreg_jax.spatial``): channels-last ``(B, X, Y, Z, C)`` images, displacement
fields ``(B, X, Y, Z, 3)`` in voxels with channel i along array axis i, and pull warping
``warped(x) = moving(x + u(x))`` with zeros outside the volume.

The names below are the public API. The JAX functions (spatial transforms, losses, the model's
``apply``) are pure and work under ``jit`` and ``grad``; the metrics are numpy/scipy functions
for evaluation on the host.
"""

from promptreg_jax.spatial import (compose, identity_grid, integrate, resample_flow, resize,
                                   sample, upsample_flow, warp)
from promptreg_jax.losses import (mind_loss, mind_ssc, orthogonality_loss,
                                  registration_objective, smoothness_loss, soft_dice_loss,
                                  task_similarity_loss)
from promptreg_jax.metrics import (dice, dsc30, fraction_nonpositive_jacobian, hd95,
                                   jacobian_determinant, sdlogj)
from promptreg_jax.model import (PromptReg, build_model, count_params, get_model, load_model,
                                 model_settings)

__version__ = "0.2.0"

__all__ = [
    # spatial transforms (jax)
    "compose", "identity_grid", "integrate", "resample_flow", "resize", "sample",
    "upsample_flow", "warp",
    # losses (jax)
    "mind_loss", "mind_ssc", "orthogonality_loss", "registration_objective", "smoothness_loss",
    "soft_dice_loss", "task_similarity_loss",
    # metrics (numpy, host)
    "dice", "dsc30", "fraction_nonpositive_jacobian", "hd95", "jacobian_determinant", "sdlogj",
    # the model
    "PromptReg", "build_model", "count_params", "get_model", "load_model", "model_settings",
]

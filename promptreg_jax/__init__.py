"""promptreg-jax: PromptReg universal 3D registration in JAX/Flax.

Conventions (see ``promptreg_jax.spatial``): channels-last ``(B, X, Y, Z, C)`` images, displacement
fields ``(B, X, Y, Z, 3)`` in voxels with channel i along array axis i, and pull warping
``warped(x) = moving(x + u(x))`` with zeros outside the volume.
"""

from promptreg_jax.spatial import (compose, identity_grid, integrate, resample_flow, resize,
                                sample, upsample_flow, warp)
from promptreg_jax.losses import (mind_loss, mind_ssc, orthogonality_loss, smoothness_loss,
                                  task_similarity_loss)
from promptreg_jax.metrics import (dice, dsc30, fraction_nonpositive_jacobian, hd95,
                                   jacobian_determinant, sdlogj)
from promptreg_jax.model import PromptReg, count_params, get_model

__version__ = "0.1.0"

"""The VoxelMorph baseline of the paper: a U-Net velocity, 7-step integration, the same losses.

    python -m promptreg_jax.train --config configs/voxelmorph.py --config.data.root=/path
"""

from promptreg_jax import recipes


def get_config(arg=None):
    del arg
    config = recipes.base_config()
    config.model.name = "voxelmorph"
    config.model.use_prompt = False
    config.loss.ort = 0.0
    config.loss.ts = 0.0
    return config

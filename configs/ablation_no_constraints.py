"""Table 2 ablation "w/o R. Cons.": the RPG kept, its regularisers L_ort and L_ts weighted 0.

    python -m promptreg_jax.train --config configs/ablation_no_constraints.py --config.data.root=/path
"""

from promptreg_jax import recipes


def get_config(arg=None):
    del arg
    config = recipes.base_config()
    config.loss.ort = 0.0
    config.loss.ts = 0.0
    return config

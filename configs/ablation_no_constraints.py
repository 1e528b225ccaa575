"""Table 2 ablation "w/o R. Cons.": the RPG kept, its regularisers L_ort and L_ts weighted 0.

    python -m promptreg_jax.train --config configs/ablation_no_constraints.py --config.data.root=/path
"""

from promptreg_jax import recipes


def get_config(arg=None):
    del arg
    return recipes.without_constraints(recipes.base_config())

"""Table 2 ablation "w/o RPG": plain RDP, no prompt generator and no prompt fusion layer.

    python -m promptreg_jax.train --config configs/ablation_no_rpg.py --config.data.root=/path

L_ort and L_ts vanish with the knowledge base; everything else is the paper's recipe.
"""

from promptreg_jax import recipes


def get_config(arg=None):
    del arg
    return recipes.without_prompt(recipes.base_config())

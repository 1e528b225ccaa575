"""PromptReg on all five real domains: the paper's recipe (SPEC section 0, "paper" column).

Run (data in the authors' layout under $PROMPTREG_DATA_ROOT/<Task>/csv/{train,test}.csv):

    python -m promptreg_jax.train --config configs/all_domains.py --workdir runs/all_domains \
        --config.data.root=/path/to/data

Expect 300 epochs x 500 pairs = 150k steps at batch 1 per device on 160^3 volumes: days on one
GPU. The run ends with a per-domain Dice table at original resolution
(runs/all_domains/final_metrics.json). Without data, try configs/demo.py.
"""

from promptreg_jax import recipes


def get_config(arg=None):
    del arg
    return recipes.base_config()

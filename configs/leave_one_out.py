"""Leave one domain out (the paper's Table 1, zero-shot rows): train on four, test on all five.

Run one per domain (abdominal, brain, hippocampus, cardiac, hip):

    python -m promptreg_jax.train --config configs/leave_one_out.py:abdominal \
        --workdir runs/loo_abdominal --config.data.root=/path/to/data

The held-out domain has no knowledge-base slot (Z = 4) and no task id; it is evaluated only,
its prompt weights coming from the dynamic prompt alone. The final table reports Dice for all
five domains, the held-out one being the zero-shot result.
"""

from promptreg_jax import recipes


def get_config(arg="abdominal"):
    config = recipes.base_config()
    config.data.domains = recipes.real_domains(held_out=arg or "abdominal")
    return config

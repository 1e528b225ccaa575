"""One tiny trained checkpoint per test process, shared by the evaluate and register tests.

Training it (2 steps of ``conftest.tiny_config``) costs one compilation of the training step;
doing that once per process rather than once per test module keeps those tests fast.
"""

from conftest import tiny_config

_RUN: dict = {}


def tiny_checkpoint(tmp_path_factory):
    """``(workdir, data_root)``: a workdir holding a 2-step checkpoint on the synthetic data."""
    if "workdir" not in _RUN:
        from promptreg_jax import train
        root = tmp_path_factory.mktemp("tiny_run")
        workdir = root / "run"
        train.train_and_evaluate(tiny_config(root, total_steps=2), str(workdir))
        _RUN["workdir"], _RUN["data"] = workdir, root / "synthetic"
    return _RUN["workdir"], _RUN["data"]

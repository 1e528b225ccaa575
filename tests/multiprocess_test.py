"""Multi-process training: 2 processes x 2 CPU devices (jax.distributed, gloo) end with the
parameters of 1 process x 4 devices. A file of its own so pytest-xdist runs it beside the
other training tests."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO_ROOT, tiny_config
from promptreg_jax import train
from train_test import _assert_params_close


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_after_a_sigterm(tmp_path):
    """Process 1 alone gets SIGTERM during step 1: both processes stop after step 1 with one
    checkpoint; rerun, they resume from it and end with the single-process parameters."""
    worker = str(REPO_ROOT / "tests" / "multiprocess_worker.py")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    root = str(tmp_path)
    # Generate the data once so the processes only read it.
    from promptreg_jax.data import synthetic
    synthetic.ensure_synthetic(str(tmp_path / "synthetic"), 24, 4, 0)
    # The reference: the same two steps in this process on its 4 devices (the program the
    # other training tests compile, loaded from the cache).
    single = train.train_and_evaluate(tiny_config(tmp_path, stop_at_step=2), tmp_path / "single")
    np.savez(tmp_path / "single.npz", loss=single["train"]["loss"],
             **{"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(jax.device_get(v))
                for path, v in jax.tree_util.tree_flatten_with_path(single["state"]["params"])[0]})
    def run(*extra):
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, worker, root, str(tmp_path / "multi"),
                                   str(tmp_path / "multi.npz"), str(i), "2", port, "2", *extra],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
                 for i in range(2)]
        return procs, [p.communicate(timeout=900) for p in procs]

    procs, outs = run("SIGTERM")
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 143, err[-3000:]
        assert f"process {i}: interrupted by SIGTERM at step 1" in out, out + err[-2000:]
    from promptreg_jax import checkpoint as ckpt_lib
    assert ckpt_lib.Checkpointer(tmp_path / "multi" / "checkpoints").all_steps() == [1]
    procs, outs = run()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "of 2: 4 devices" in out
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    _assert_params_close({k: a[k] for k in a.files if k != "loss"},
                         {k: b[k] for k in b.files if k != "loss"})

"""One process of a multi-process training run (used by train_test.py, not collected itself).

    python tests/multiprocess_worker.py ROOT WORKDIR OUT.npz PROCESS_ID NUM_PROCESSES PORT DEVICES [SIGTERM]

Runs two training steps of the tiny test config with ``jax.distributed`` over CPU devices
(gloo collectives) and writes the final parameters from process 0. With a last argument
``SIGTERM``, process 1 sends itself SIGTERM during its first step (a preemption notice that
reaches one host): every process must stop at the same step boundary after writing one
checkpoint, and exit with 143.
"""

import os
import sys

root, workdir, out, pid, nproc, port, ndev = sys.argv[1:8]
sigterm = sys.argv[8:9] == ["SIGTERM"]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_config  # noqa: E402

if int(nproc) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", int(nproc), int(pid))

from promptreg_jax import train  # noqa: E402

if sigterm and int(pid) == 1:
    import signal
    real = train.make_train_fns

    class Preempted:
        """The jitted step (or its compiled form, which the multi-process trainer uses), sending
        SIGTERM to this process each time it runs."""

        def __init__(self, fn):
            self.fn = fn

        def lower(self, *args):
            lowered = self.fn.lower(*args)
            return type("Lowered", (), {"compile": lambda _: Preempted(lowered.compile())})()

        def __getattr__(self, name):  # memory_analysis() etc. of the compiled step
            return getattr(self.fn, name)

        def __call__(self, state, batch):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step runs
            return self.fn(state, batch)

    def preempted(*a, **kw):
        init, step_fn, abstract, sharding = real(*a, **kw)
        return init, Preempted(step_fn), abstract, sharding

    train.make_train_fns = preempted

config = tiny_config(root, stop_at_step=2, checkpoint_every_steps=100)
try:
    result = train.train_and_evaluate(config, workdir)
except train.Interrupted as e:
    print(f"process {jax.process_index()}: {e}", flush=True)
    sys.exit(128 + e.signum)
params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), result["state"]["params"])
if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out, loss=result["train"]["loss"], **flat)
print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, "
      f"loss {result['train']['loss']:.6f}", flush=True)

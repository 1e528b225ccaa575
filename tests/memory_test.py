"""``promptreg_jax.memory``: a child's own peak RSS, and compiling in one process then loading the
executable from JAX's persistent cache in another (no timing asserted)."""

import json
import math
import os
import subprocess
import sys
import textwrap

from promptreg_jax import memory


def test_release_freed_heap_runs():
    assert memory.release_freed_heap() in (True, False)


def test_run_measured_reports_the_childs_own_peak():
    # 400 MiB touched page by page: the child's peak is at least that. Measured from a small
    # parent, as the benchmark does: a forked child's peak also counts the parent's pages it
    # held before exec (from this pytest process with JAX loaded it read 4.1 GiB).
    code = "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('done', len(b))"
    parent = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("memory", {memory.__file__!r})
        memory = importlib.util.module_from_spec(spec); spec.loader.exec_module(memory)
        big = memory.run_measured([sys.executable, "-c", {code!r}], timeout=120)
        small = memory.run_measured([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=120)
        slow = memory.run_measured([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
        print(json.dumps(dict(big=big, small=small, slow=slow)))
    """)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    big, small, slow = r["big"], r["small"], r["slow"]
    assert big["returncode"] == 0 and "done 419430400" in big["output"]
    assert 400 / 1024 <= big["peak_rss_gib"] < 400 / 1024 + 0.3
    assert small["returncode"] == 3 and small["peak_rss_gib"] < 400 / 1024
    assert slow["returncode"] is None and slow["seconds"] < 30


def test_cache_settings_as_environment():
    env = memory.compilation_cache_env("/some/dir")
    assert env == {"JAX_COMPILATION_CACHE_DIR": "/some/dir",
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


_PROGRAM = """
import jax, jax.numpy as jnp, numpy as np
x = np.ones(4, np.float32)
f = jax.jit(lambda x: jnp.sin(x) * 2.0 + jnp.arange(4.0))
"""


def test_compiled_in_one_process_loaded_in_another(tmp_path):
    cache = str(tmp_path / "cache")
    compile_only = _PROGRAM + "f.lower(x).compile(); print('compiled')"
    r = memory.run_measured([sys.executable, "-c", compile_only],
                            env=dict(os.environ, **memory.compilation_cache_env(cache)),
                            timeout=300)
    assert r["returncode"] == 0, r["output"]
    # A fresh process without the environment: use_compilation_cache() alone must find the entry.
    load = textwrap.dedent("""
        import json, sys
        from promptreg_jax import memory
        memory.use_compilation_cache(sys.argv[1])
        import jax
        hits = []
        jax.monitoring.register_event_listener(
            lambda name, **kw: hits.append(name))
    """) + _PROGRAM + "print(json.dumps(dict(events=hits, y=f(x).tolist())))"
    p = subprocess.run([sys.executable, "-c", load, cache], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["events"].count("/jax/compilation_cache/cache_hits") == 1, out["events"]
    assert max(abs(a - (2 * math.sin(1.0) + k)) for k, a in enumerate(out["y"])) < 1e-6


def test_compiled_executable_survives_release_compile_caches():
    import jax
    import jax.numpy as jnp
    import numpy as np
    f = jax.jit(lambda x: jnp.cos(x) + 1.0)
    compiled = f.lower(np.zeros(3, np.float32)).compile()
    f(np.zeros(3, np.float32))
    assert f._cache_size() == 1
    assert memory.release_compile_caches() in (True, False)
    assert f._cache_size() == 0  # the jit object's trace / executable cache was dropped
    np.testing.assert_allclose(compiled(np.array([0.0, np.pi, np.pi / 2], np.float32)),
                               [2.0, 0.0, 1.0], atol=1e-6)


class _ToyModel:
    """Stands in for the network in ``evaluate_lib.predict_fn``: six independent branches whose
    results are combined one after another, so the operation order decides the peak."""

    @staticmethod
    def apply(variables, moving, fixed, task_id):
        import jax.numpy as jnp
        x = moving + variables["params"]["w"] * fixed
        ys = [jnp.sin(x * (i + 1)) @ x for i in range(6)]
        out = ys[0]
        for y in ys[1:]:
            out = jnp.tanh(out @ y)
        return {"flow": out, "prompt_weights": jnp.sum(out, keepdims=True)}


def test_cpu_compiler_options_follow_platform_and_environment(monkeypatch):
    from promptreg_jax import conv
    monkeypatch.delenv(memory.SCHEDULER_ENV, raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    want = {memory.CPU_SCHEDULER_OPTION: memory.CPU_MEMORY_SCHEDULER}
    assert memory.cpu_compiler_options("cpu") == want
    assert memory.cpu_compiler_options("tpu") == {} and memory.cpu_compiler_options("cuda") == {}
    with conv.target_platform("tpu"):  # compile-only runs for an accelerator
        assert memory.cpu_compiler_options() == {}
    monkeypatch.setenv("XLA_FLAGS", f"--{memory.CPU_SCHEDULER_OPTION}=CPU_SCHEDULER_TYPE_DEFAULT")
    assert memory.cpu_compiler_options("cpu") == {}  # the user's own choice wins
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv(memory.SCHEDULER_ENV, "default")
    assert memory.cpu_compiler_options("cpu") == {}
    monkeypatch.setenv(memory.SCHEDULER_ENV, "fast")
    import pytest
    with pytest.raises(ValueError, match=memory.SCHEDULER_ENV):
        memory.cpu_compiler_options("cpu")


def test_predict_fn_compiles_with_the_memory_scheduler(monkeypatch):
    """The inference program's buffer plan is the memory-optimised scheduler's (smaller than
    XLA:CPU's default order on a program with independent branches), with the same numbers."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from promptreg_jax import evaluate_lib
    monkeypatch.delenv(memory.SCHEDULER_ENV, raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    params = {"w": jnp.float32(0.5)}
    x = jnp.asarray(np.random.default_rng(0).standard_normal((128, 128)), jnp.float32) / 16
    plain = jax.jit(lambda p, m, f: evaluate_lib._apply_flow_weights(_ToyModel, p, m, f))
    ours = evaluate_lib.predict_fn(_ToyModel)
    temp = lambda fn: fn.lower(params, x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp(ours) < 0.7 * temp(plain), (temp(ours), temp(plain))
    np.testing.assert_allclose(np.asarray(ours(params, x, x)[0]),
                               np.asarray(plain(params, x, x)[0]), rtol=1e-6, atol=1e-6)

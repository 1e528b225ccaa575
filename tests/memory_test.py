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


class _FakeCompiled:
    """A compiled program as ``least_recompute`` reads it: ``memory_analysis()`` only."""

    def __init__(self, temp):
        self.temp = temp

    def memory_analysis(self):
        import types
        return types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=100,
                                     alias_size_in_bytes=100, temp_size_in_bytes=self.temp)


def test_least_recompute_keeps_the_first_mode_that_fits():
    plans = {"none": 900, "levels": 500, "blocks": 300}  # peak = 100 + temp
    compiled = []

    def compile_mode(mode):
        compiled.append(mode)
        return _FakeCompiled(plans[mode])

    mode, prog, tried = memory.least_recompute(compile_mode, 700, "cpu")
    assert mode == "levels" and prog.temp == 500
    assert tried == [("none", 1000.0), ("levels", 600.0)] and compiled == ["none", "levels"]
    # an ample or unknown budget compiles one program: no recomputation
    compiled.clear()
    assert memory.least_recompute(compile_mode, 2000, "cpu")[0] == "none"
    assert memory.least_recompute(compile_mode, None, "gpu")[0] == "none"
    assert compiled == ["none", "none"]


def test_least_recompute_counts_a_refused_tpu_compile_as_not_fitting():
    def compile_mode(mode):
        if mode == "none":  # the TPU compiler's refusal, as XLA words it
            raise RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
                               "memory in memory space hbm. Used 30.20G of 15.75G hbm.")
        return _FakeCompiled(2 ** 30)

    mode, _, tried = memory.least_recompute(compile_mode, 15.75 * 2 ** 30, "tpu")
    assert mode == "levels"
    assert tried[0] == ("none", 30.2 * 2 ** 30) and tried[1][0] == "levels"


def test_least_recompute_says_what_each_mode_needs_when_nothing_fits(monkeypatch):
    import pytest
    monkeypatch.delenv("PROMPTREG_SAMPLER", raising=False)
    with pytest.raises(memory.DoesNotFitError) as e:
        memory.least_recompute(lambda m: _FakeCompiled(3 * 2 ** 30), 2 ** 30, "gpu")
    msg = str(e.value)
    assert "\n" not in msg and "does not fit 1.00 GiB per device" in msg
    assert "remat=none: 3.00 GiB, remat=levels: 3.00 GiB, remat=blocks: 3.00 GiB" in msg
    assert "PROMPTREG_SAMPLER=mixed" in msg   # on an accelerator, the leaner sampler is named
    with pytest.raises(memory.DoesNotFitError) as e:
        memory.least_recompute(lambda m: _FakeCompiled(3 * 2 ** 30), 2 ** 30, "cpu")
    assert "PROMPTREG_SAMPLER" not in str(e.value)
    # another compile error is not a memory verdict: it propagates
    with pytest.raises(ValueError, match="bad shape"):
        memory.least_recompute(lambda m: (_ for _ in ()).throw(ValueError("bad shape")), 1, "cpu")


def test_least_recompute_reads_a_real_compiled_plan():
    """A toy with two 'modes' whose XLA:CPU plans differ by ~64 MiB: the budget between them
    picks the smaller one, with the needs memory_analysis reports."""
    import jax
    import jax.numpy as jnp

    def compile_mode(mode):
        n = {"none": 1 << 24, "levels": 1 << 20}[mode]  # floats held at once
        f = jax.jit(lambda x: jnp.sum(jnp.sin(jnp.broadcast_to(x, (n,)) * jnp.arange(n))))
        return f.lower(jax.ShapeDtypeStruct((), jnp.float32)).compile()

    mode, _, tried = memory.least_recompute(compile_mode, 32 * 2 ** 20, "cpu",
                                            modes=("none", "levels"))
    assert mode == "levels", tried
    assert tried[0][1] >= 4 * (1 << 24) * 0.9 and tried[1][1] <= 32 * 2 ** 20


def test_device_budget_on_the_cpu_is_a_share_of_available_memory():
    import jax
    cpu = jax.devices("cpu")[0]
    one, four = memory.device_budget_bytes(cpu, 1), memory.device_budget_bytes(cpu, 4)
    avail = memory.host_available_bytes()
    assert 0.7 * avail < one < 0.9 * avail
    assert abs(four * 4 / one - 1) < 0.1  # four local devices share the host
    assert memory.fmt_gib(1.5 * 2 ** 30) == "1.50 GiB" and memory.fmt_gib(3 * 2 ** 20) == "3.0 MiB"

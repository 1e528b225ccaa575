"""benchmarks/heap_top.py: the replay of a temp heap from an XLA dump."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import heap_top  # noqa: E402

BUFFERS = """allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}:
 value: <1 p @0> (size=64,offset=0): f32[16]{0}
allocation 1: size 3000, preallocated-temp:
 value: <2 a @0> (size=1000,offset=0): f32[250]{0}
 value: <3 b @0> (size=1000,offset=1000): f32[250]{0}
 value: <4 c @0> (size=1000,offset=2000): f32[250]{0}
 value: <5 d @0> (size=500,offset=0): f32[125]{0}
 value: <6 d.alias @0> (size=500,offset=0): f32[125]{0}
"""
# a and b live together early; c starts after a ends, yet sits above b: the top (3000 bytes) is
# reached with 2000 bytes live. d and its alias share an offset (counted once).
RANGES = """HloLiveRange (max 9):
  InstructionSequence:
    0:p
  BufferLiveRange:
    a{}:1-3
    b{}:2-6
    c{}:4-5
    d{}:7-8
    d.alias{}:7-8
  Live ranges at 2 (peak):
    a{}: 1000 bytes
"""


def test_the_top_of_the_heap_and_what_is_live_then():
    r = heap_top.heap_top(BUFFERS, RANGES)
    assert (r.heap_bytes, r.top_bytes, r.time, r.live_bytes) == (3000, 3000, 4, 2000)
    assert [b.name for b in r.live] == ["b", "c"]


def test_shared_offsets_count_once():
    only_d = "\n".join(line for line in BUFFERS.splitlines()
                       if " a @" not in line and " b @" not in line and " c @" not in line)
    r = heap_top.heap_top(only_d, RANGES)
    assert (r.top_bytes, r.time, r.live_bytes) == (500, 7, 500)


def test_bad_input_is_one_line(tmp_path, capsys):
    assert heap_top.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "xla_dump_to" in err
    with pytest.raises(ValueError, match="preallocated-temp"):
        heap_top.heap_top("allocation 0: size 4, parameter 0:\n", RANGES)


def test_a_real_xla_cpu_dump(tmp_path):
    """XLA:CPU's dump of a small program: the replayed heap is the compiled temp size."""
    code = ("import jax, jax.numpy as jnp\n"
            "f = lambda x: ((jnp.sin(x) @ x).sum(), (jnp.cos(x) @ jnp.exp(x)).sum())\n"
            "c = jax.jit(f).lower(jnp.ones((64, 64))).compile()\n"
            "print(c.memory_analysis().temp_size_in_bytes)\n")
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    ba, lr = heap_top.find_files(pathlib.Path(tmp_path), "jit__lambda")
    r = heap_top.heap_top(ba.read_text(), lr.read_text())
    assert r.heap_bytes == int(out.split()[-1])
    assert 0 < r.live_bytes <= r.top_bytes <= r.heap_bytes

"""Keeps ``benchmarks/run.py`` from rotting: a tiny run (16^3: convs, MIND, loader) and its JSON.

Not a timed test: it asserts nothing about speed.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_script_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--sizes", "16",
           "--what", "conv,mind,loader", "--repeats", "1", "--loader-batches", "3",
           "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "matmul bound" in p.stdout and "backend=" in p.stdout
    res = json.loads(out.read_text())
    for key in ("backend", "device_count", "jax", "jaxlib", "flax", "numpy"):
        assert key in res["env"]
    assert res["matmul"]["flops_per_s"] > 0
    assert res["config"]["sizes"] == [16]
    (mind,) = res["mind"]
    assert mind["size"] == 16 and mind["speedup"] > 0
    for impl in ("fast", "straightforward"):
        assert mind[impl]["fwd_bwd_s"] > 0 and mind[impl]["compile_s"] >= 0
    assert mind["max_abs_loss_diff"] < 1e-5  # both box filters compute the same loss
    (loader,) = res["loader"]
    assert loader["size"] == 16 and loader["pairs"] == 3 and loader["pairs_per_s"] > 0
    (conv,) = res["conv"]
    assert [c["cout"] for c in conv["convs"]] == [48, 96, 192, 3, 16]
    for c in conv["convs"]:
        assert c["max_rel_diff"] < 1e-4  # native and depth-sum: the same numbers, with gradients
        assert c["native"]["fwd_bwd_s"] > 0 and c["depth_sum"]["fwd_s"] > 0
    assert res["train"] == [] and res["infer"] == []

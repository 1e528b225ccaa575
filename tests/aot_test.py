"""The compile-only report's own logic (``benchmarks/aot.py``) with the ``cpu`` target.

No libtpu or CUDA plugin needed: the arithmetic (targets, roofline, fit verdict, topology names,
out-of-memory messages, the printed verdict line) is tested directly, and one tiny inference
program is compiled end to end for the cpu target.
"""

import importlib.util
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("aot", REPO / "benchmarks" / "aot.py")
aot = importlib.util.module_from_spec(_spec)
sys.modules["aot"] = aot  # dataclasses look their module up
_spec.loader.exec_module(aot)
GIB = 2 ** 30


def test_target_table_is_complete_and_gpu_descriptions_exist():
    for name in ("tpu:v5e", "tpu:v4", "tpu:v5p", "tpu:v6e", "gpu:a100-40", "gpu:a100-80",
                 "gpu:h100", "gpu:h200", "cpu"):
        t = aot.TARGETS[name]
        assert t.peak_flops_bf16 > 0 and t.peak_flops_f32 > 0 and t.hbm_bytes_per_s > 0
        assert t.platform == name.split(":")[0]
        if t.platform != "cpu":
            assert t.memory_bytes >= 16 * GIB
        if t.platform == "gpu":
            text = (aot.TARGET_DIR / t.target_config).read_text()
            assert "core_count" in text and 'platform_name: "CUDA"' in text
            mem = int(text.split("device_memory_size:")[1].split()[0])
            assert mem == int(t.memory_bytes)  # the table and the description agree
    assert aot.TARGETS["tpu:v4"].chip_config == "megacore"


def test_roofline_arithmetic():
    t = aot.TARGETS["tpu:v5e"]
    r = aot.roofline(197e12, 819e9 * 3, t, "float32")  # 1 s of compute, 3 s of HBM traffic
    assert r["compute_s"] == pytest.approx(1.0) and r["memory_s"] == pytest.approx(3.0)
    assert r["time_s"] == pytest.approx(3.0) and r["bound"] == "memory"
    g = aot.TARGETS["gpu:a100-40"]
    r = aot.roofline(312e12, 1555e9 * 0.5, g, "bfloat16")
    assert r["time_s"] == pytest.approx(1.0) and r["bound"] == "compute"
    assert aot.roofline(156e12, None, g, "float32")["time_s"] == pytest.approx(1.0)  # TF32
    assert aot.roofline(None, None, g, "float32")["time_s"] is None


def test_fit_verdict():
    assert aot.fit_verdict(15 * GIB, 16 * GIB)["fits"]
    assert aot.fit_verdict(16 * GIB, 16 * GIB)["fits"]
    v = aot.fit_verdict(17 * GIB, 16 * GIB)
    assert not v["fits"] and v["needed"] == 17 * GIB
    v = aot.fit_verdict(None, 15.75 * GIB, needed_bytes=30.2 * GIB)
    assert not v["fits"] and v["needed"] == 30.2 * GIB
    with pytest.raises(aot.AotError):
        aot.fit_verdict(None, 16 * GIB)


def test_resource_exhausted_message_is_parsed():
    msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
           "space hbm. Used 30.20G of 15.75G hbm. Exceeded hbm capacity by 14.45G.\n"
           "Total hbm usage >= 30.45G: ... total memory required for HLO temporaries (30.20G) "
           "exceeds available HBM (15.75G)")
    needed, available = aot.parse_resource_exhausted(msg)
    assert needed == pytest.approx(30.20 * GIB) and available == pytest.approx(15.75 * GIB)
    assert aot.parse_resource_exhausted("something else") == (None, None)


def test_compile_log_is_parsed():
    # Lines as XLA:CPU and libtpu print them with --compile-profile (abridged).
    log = "\n".join([
        "I1202 22:43:00.1 1 hlo_pass_pipeline.cc:176] HLO pass: layout-assignment time: 5.0 s "
        "(5 s) (cumulative: 9 s, max: 5 s, #called: 1)",
        "I1202 22:43:00.2 1 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 300 ms (0.3 s)",
        "I1202 22:43:00.3 1 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 500 ms (0.5 s)",
        "I1202 22:43:00.4 1 hlo_pass_pipeline.cc:176] HLO pass: dce time: 8 us (8 us)",
        "I1202 22:43:21.8 1 deepsea_compiler_hlo_passes.cc:6241] HLO_PASSES stage duration: "
        "21.124787125s",
        "I1202 22:48:02.1 1 deepsea_compiler_base.cc:3931] BACKEND_PASSES stage duration: "
        "4m38.9455006s",
        "I1202 22:48:28.0 1 deepsea_compiler_backend.cc:1488] CODE_GENERATION stage duration: "
        "25.856677374ms",
        "W1202 22:45:26.7 1 lowering_emitter.cc:6105] HLO: unrelated line",
    ])
    prof = aot.parse_compile_log(log, top=2)
    assert prof["hlo_passes_s"] == pytest.approx(5.8 + 8e-6)
    assert prof["passes"] == [["layout-assignment", pytest.approx(5.0), 1],
                              ["algsimp", pytest.approx(0.8), 2]]
    assert prof["stages"]["HLO_PASSES"] == pytest.approx(21.124787125)
    assert prof["stages"]["BACKEND_PASSES"] == pytest.approx(278.9455006)
    assert prof["stages"]["CODE_GENERATION"] == pytest.approx(0.025856677374)
    empty = aot.parse_compile_log("no timings here")
    assert empty == {"hlo_passes_s": None, "stages": {}, "passes": []}


def test_topology_names_and_mesh_parsing():
    assert aot.tpu_topology(aot.TARGETS["tpu:v5e"], 1) == "v5e:1x1"
    assert aot.tpu_topology(aot.TARGETS["tpu:v5e"], 4) == "v5e:2x2"
    assert aot.tpu_topology(aot.TARGETS["tpu:v5e"], 16) == "v5e:4x4"
    assert aot.tpu_topology(aot.TARGETS["tpu:v4"], 1) == "v4:1x1x1"
    assert aot.tpu_topology(aot.TARGETS["tpu:v4"], 4) == "v4:2x2x1"
    with pytest.raises(aot.AotError):
        aot.tpu_topology(aot.TARGETS["tpu:v5e"], 3)
    assert aot.parse_mesh("data=2,space=2") == {"data": 2, "space": 2}
    assert aot.parse_mesh("data=4") == {"data": 4, "space": 1}
    with pytest.raises(aot.AotError):
        aot.parse_mesh("model=2")
    assert aot.parse_size("160") == (160, 160, 160)
    assert aot.parse_size("160x192x160") == (160, 192, 160)
    with pytest.raises(aot.AotError):
        aot.parse_size("100")


def _result(**kw):
    r = dict(target="tpu:v5e", devices=1, topology="v5e:1x1", mesh="data=1,space=1",
             what="train", size=[160, 160, 160], batch=1, dtype="float32", remat=False,
             conv_impl="native", sampler="cells", config="configs/all_domains.py",
             compile_s=12.0, flops=2e12, bytes_accessed=1e12,
             memory=dict(peak=10 * GIB, arguments=1 * GIB, outputs=1 * GIB, aliased=1 * GIB,
                         temporaries=9 * GIB))
    r.update(kw)
    t = aot.TARGETS[r["target"]]
    r.setdefault("verdict", aot.fit_verdict(r["memory"]["peak"], t.memory_bytes))
    r["roofline"] = aot.roofline(r["flops"], r["bytes_accessed"], t, r["dtype"])
    return r


def test_report_ends_with_the_verdict_line():
    text = aot.format_report(_result())
    assert text.splitlines()[-1].startswith("verdict: fits")
    assert "10.00 GiB of 16.00 GiB" in text and "2.000 TFLOP" in text and "1.000 TB" in text
    assert "1.221 s" in text  # 1e12 B / 819 GB/s: memory-bound
    over = _result(verdict=aot.fit_verdict(None, 15.75 * GIB, needed_bytes=30.2 * GIB),
                   error_needed_bytes=30.2 * GIB, bytes_accessed=None)
    last = aot.format_report(over).splitlines()[-1]
    assert last.startswith("verdict: does not fit") and "30.20 GiB" in last
    tpu = _result(compile_s=330.0, compile_profile={
        "hlo_passes_s": 20.4, "passes": [["layout-assignment", 5.0, 1]],
        "stages": {"HLO_PASSES": 21.1, "BACKEND_PASSES": 278.9, "CODE_GENERATION": 25.9}})
    line = [x for x in aot.format_report(tpu).splitlines() if x.strip().startswith("profile")][0]
    assert "HLO passes 20 s, backend 279 s, code generation 26 s" in line
    assert "layout-assignment 5.0 s" in line
    cpu = _result(compile_s=30.0, compile_profile={"hlo_passes_s": 4.0, "passes": [],
                                                   "stages": {}})
    assert "the rest (backend, code generation) 26 s" in aot.format_report(cpu)
    none = _result(compile_profile={"hlo_passes_s": None, "passes": [], "stages": {}})
    assert "no pass timings" in aot.format_report(none)


def test_missing_libtpu_is_one_line_and_exit_code_2(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert aot.main(["--target", "tpu:v5e", "--size", "16"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: libtpu is not installed")
    assert aot.main(["--target", "tpu:v9"]) == 2


TINY_CONFIG = """
from promptreg_jax import recipes

def get_config(arg=None):
    c = recipes.base_config()
    c.model.channels = 2
    c.model.schedule = (1, 1, 1, 1)
    c.model.int_steps = 1
    c.data.image_size = (16, 16, 16)
    return c
"""


def test_cpu_target_end_to_end_inference(tmp_path, capsys):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(TINY_CONFIG)
    out_json = tmp_path / "r.json"
    rc = aot.main(["--target", "cpu", "--what", "infer", "--config", str(cfg),
                   "--capacity-gib", "1", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0, text
    lines = text.strip().splitlines()
    assert lines[-1].startswith("verdict: fits") and "conv depth_sum" in text
    assert "sampler scatter" in text
    import json
    r = json.loads(out_json.read_text())
    assert r["memory"]["peak"] > 0 and r["flops"] > 0 and r["bytes_accessed"] > 0
    assert r["verdict"]["capacity"] == GIB
    # The same figures against a tiny capacity: the verdict flips.
    r["verdict"] = aot.fit_verdict(r["memory"]["peak"], 1e-6 * GIB)
    assert aot.format_report(r).splitlines()[-1].startswith("verdict: does not fit")


def test_cpu_target_spatially_sharded_train_step(tmp_path, capsys):
    """``--mesh data=1,space=2`` compiles the trainer's own step with its (data, space) mesh:
    volumes split along X over 2 devices (conftest gives 4 CPU devices)."""
    cfg = tmp_path / "tiny.py"
    cfg.write_text(TINY_CONFIG)
    out_json = tmp_path / "r.json"
    rc = aot.main(["--target", "cpu", "--what", "train", "--config", str(cfg), "--mesh",
                   "data=1,space=2", "--conv-impl", "native", "--capacity-gib", "1",
                   "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "2 device(s)" in text and "mesh data=1,space=2" in text
    assert text.strip().splitlines()[-1].startswith("verdict: fits")
    import json
    r = json.loads(out_json.read_text())
    assert r["volume_spec"] == "P('data', 'space')"
    assert r["memory"]["peak"] > 0 and r["flops"] > 0
    # A mesh the image cannot be split by: one line, exit 2, nothing compiled.
    assert aot.main(["--target", "cpu", "--what", "train", "--config", str(cfg), "--mesh",
                     "data=1,space=4"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "must be a multiple of 8 x space = 32" in out[0], out

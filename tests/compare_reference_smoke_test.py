"""Keeps ``benchmarks/compare_reference.py`` from rotting, without torch or the authors' code.

The harness's logic (why the reference is not run, the summaries, the ratio lines, the
orchestration with faked children) is tested in-process in seconds; one tiny real run (16^3
inference, one call; ``slow``: it compiles the network) checks the port's child end to end. Not a timed test: it asserts nothing about speed.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "compare_reference.py")


@pytest.fixture(scope="module")
def cr():
    spec = importlib.util.spec_from_file_location("compare_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(median_s, rss_gib, **kw):
    return dict(median_s=median_s, rss_gib=rss_gib, calls=3, processes=1, flops=1e11, **kw)


def test_ratio_line_format(cr):
    port, ref = _summary(3.9, 1.9), _summary(5.0, 2.0)
    assert cr.ratio_line("train", 64, port, ref) == "ratio train 64: time 0.78x, peak RSS 0.95x"
    assert cr.ratio_line("infer", 96, None, ref, why_not="reference not run") == \
        "ratio infer 96: n/a (reference not run)"
    assert cr.ratio_line("train", 64, port, None).startswith("ratio train 64: n/a (")


def test_gpu_runs_compare_gpu_memory(cr):
    """``--device gpu``: the children are told, the peak GPU memory is pooled and compared."""
    args = cr.parse_args(["--sizes", "32", "--device", "gpu"])
    for kind in ("port", "reference", "parity"):
        cmd = cr._child_cmd("py", kind, "train", 32, args)
        assert cmd[cmd.index("--device") + 1] == "gpu"
    assert cr._torch_device(args) == "cuda" and cr._torch_device(cr.parse_args([])) == "cpu"
    runs = [dict(times_s=[0.4], rss_gib=3.0, flops=1.0, device_peak_gib=12.0),
            dict(times_s=[0.6], rss_gib=2.0, flops=1.0, device_peak_gib=13.0)]
    port, ref = cr.summarise(runs), _summary(0.8, 1.0, device_peak_gib=10.0)
    assert port["device_peak_gib"] == 13.0
    assert cr.ratio_line("train", 160, port, ref) == \
        "ratio train 160: time 0.62x, peak GPU memory 1.30x"
    assert "| 160^3 train | 0.80 s, 1.00 GiB (GPU 10.00 GiB) | 0.50 s, 3.00 GiB (GPU 13.00 GiB) |" \
        in cr.table({(160, "train"): (port, ref)})


def test_summaries_pool_every_timed_call(cr):
    runs = [dict(times_s=[1.0, 5.0], rss_gib=2.0, flops=7.0, compile_s=10.0, run_rss_gib=1.5),
            dict(times_s=[2.0], rss_gib=3.0, flops=7.0, compile_s=20.0, run_rss_gib=1.0)]
    s = cr.summarise(runs)
    assert s["median_s"] == 2.0 and s["calls"] == 3 and s["processes"] == 2
    assert s["rss_gib"] == 3.0 and s["run_rss_gib"] == 1.5  # the largest peak of any process
    assert s["compile_s"] == 15.0 and s["flops"] == 7.0
    assert cr.summarise([]) is None
    assert cr.summarise(runs + [dict(error="exit 1")]) is None
    md = cr.table({(64, "train"): (s, None)})
    assert "| 64^3 train | not run | 2.00 s, 3.00 GiB |" in md


def test_parity_tolerances(cr):
    good = dict(rel_diff={k: 0.0 for k in cr.PARITY_TOL})
    assert cr.parity_ok(good)
    assert not cr.parity_ok(dict(rel_diff=dict(good["rel_diff"], loss=1e-2)))


def test_reference_status_says_why_not(cr, tmp_path):
    ok, why = cr.reference_status(None)
    assert not ok and "no --reference-dir" in why and "xiehousheng/PromptReg" in why
    ok, why = cr.reference_status(str(tmp_path))
    assert not ok and "PromptReg.py or train.py" in why
    (tmp_path / "PromptReg.py").write_text("")
    (tmp_path / "train.py").write_text("")
    ok, why = cr.reference_status(str(tmp_path))
    if importlib.util.find_spec("torch") is None:
        assert not ok and why.startswith("torch is not installed")
    else:
        assert ok and why == ""


def test_load_reference_stubs_their_data_pipeline(cr, tmp_path, monkeypatch):
    # Stand-ins with the reference's import structure: train.py imports `dataset` (medpy, pandas
    # in the real one) and `PromptReg` at module level.
    (tmp_path / "PromptReg.py").write_text("class PromptReg:\n    pass\n")
    (tmp_path / "train.py").write_text(
        "from PromptReg import PromptReg\nfrom dataset import MultiTaskRegistrationDataset\n"
        "class MIND_loss:\n    pass\nclass Grad3d:\n    pass\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("dataset", "PromptReg"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    model, mind, grad = cr.load_reference(str(tmp_path))
    assert (model.__name__, mind.__name__, grad.__name__) == ("PromptReg", "MIND_loss", "Grad3d")


def test_orchestration_without_the_reference(cr, tmp_path, monkeypatch, capsys):
    """main() with the children faked: the one-line reason, the port's rounds, table, ratios."""
    calls = []

    def fake_child(cmd, timeout, env=None, **info):
        calls.append(cmd)
        size = int(cmd[cmd.index("--sizes") + 1])
        return dict(side="port", mode=cmd[cmd.index("--child-mode") + 1], size=size,
                    median_s=0.5, times_s=[0.5, 0.7], compile_s=9.0, rss_gib=1.25,
                    run_rss_gib=1.0, rss_compile_gib=1.2, plan_temp_gib=0.3, flops=2e11)

    monkeypatch.setattr(cr.bench, "run_json_child", fake_child)
    out = tmp_path / "fake.json"
    res = cr.main(["--sizes", "32", "64", "--modes", "train,infer", "--rounds", "2",
                   "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    not_run = [line for line in lines if line.startswith("reference not run:")]
    assert len(not_run) == 1 and "no --reference-dir" in not_run[0]
    assert len(calls) == 2 * 2 * 2 and all("port" == c[c.index("--child") + 1] for c in calls)
    ratios = [line for line in lines if line.startswith("ratio ")]
    assert ratios == [f"ratio {m} {s}: n/a (reference not run)"
                      for s in (32, 64) for m in ("train", "infer")]
    assert "| 64^3 train | not run | 0.60 s, 1.25 GiB | 9 s / 1.20 GiB / 1.00 GiB / 0.30 GiB |" \
        in "\n".join(lines)
    assert json.loads(out.read_text())["summary"]["train 64"]["port"]["calls"] == 4
    assert res["reference_run"] is False


def test_aot_option_reaches_only_the_measuring_process(cr):
    """``aot``: the measuring port process gets --aot; the compiling process it starts does not
    (it would start another one), but it does get the options that change what is compiled."""
    assert cr.parse_port_config("remat+trim+aot") == {"remat", "trim", "aot"}
    args = cr.parse_args(["--sizes", "32", "--port-configs", "remat+aot"])
    config = args.port_configs[0][1]
    port = cr._child_cmd("py", "port", "train", 32, args, config)
    assert "--aot" in port and "--remat" in port
    args.aot, args.remat = True, True  # what the measuring process parses from `port`
    compile_cmd = cr._child_cmd("py", "port-compile", "train", 32, args)
    assert "--aot" not in compile_cmd and "--remat" in compile_cmd
    assert compile_cmd[compile_cmd.index("--child") + 1] == "port-compile"


@pytest.mark.slow
def test_aot_port_loads_every_executable_from_the_cache(tmp_path):
    """16^3 inference with ``--aot``: the measuring process compiles nothing itself."""
    cmd = [sys.executable, SCRIPT, "--child", "port", "--child-mode", "infer", "--sizes", "16",
           "--repeats", "1", "--aot", "--malloc-trim"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("BENCH_CHILD_JSON:")][-1]
    r = json.loads(line.split(":", 1)[1])
    assert r["aot_cache_events"]["cache_misses"] == 0 and r["aot_cache_events"]["cache_hits"] >= 2
    assert r["aot_compile_process_rss_gib"] > 0 and not os.path.exists(r["aot_cache_dir"])


@pytest.mark.slow
def test_port_alone_when_the_reference_is_not_given(tmp_path):
    out = tmp_path / "compare.json"
    cmd = [sys.executable, SCRIPT, "--sizes", "16", "--modes", "infer", "--repeats", "1",
           "--rounds", "1", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    not_run = [line for line in lines if line.startswith("reference not run:")]
    assert len(not_run) == 1 and "no --reference-dir" in not_run[0]
    assert lines[-2] == "ratio infer 16: n/a (reference not run)"
    res = json.loads(out.read_text())
    assert res["reference_run"] is False and res["parity"] is None
    port = res["summary"]["infer 16"]["port"]
    assert port["median_s"] > 0 and port["rss_gib"] > 0 and port["calls"] == 1
    assert res["summary"]["infer 16"]["reference"] is None
    (run,) = res["runs"]
    assert run["side"] == "port" and run["plan_temp_gib"] >= 0 and run["flops"] > 0

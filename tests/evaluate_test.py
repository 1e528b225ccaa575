"""Evaluation CLI: per-domain CSV/JSON, results.md in the Table 1 layout, held-out marks, errors."""

import csv
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from tiny_checkpoint import tiny_checkpoint
from promptreg_jax import evaluate

DOMAINS = ["Abdominal", "Brain", "Hippocampus", "Cardiac", "Hip"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def test_evaluate_end_to_end(run, tmp_path, capsys):
    workdir, _ = run
    out = tmp_path / "eval"
    assert evaluate.main(["--workdir", str(workdir), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["domains"]) == DOMAINS
    assert summary["held_out"] == [] and summary["training_domains"] == DOMAINS
    assert summary["step"] == 2
    for name in DOMAINS:
        rows = list(csv.DictReader(open(out / f"{name}.csv")))
        assert rows, name
        s = json.loads((out / f"{name}.json").read_text())
        assert s["pairs"] == len(rows)
        dice = np.asarray([float(r["dice"]) for r in rows])
        assert np.all((dice >= 0) & (dice <= 1))
        np.testing.assert_allclose(s["dice_mean"], dice.mean(), rtol=1e-5)
        np.testing.assert_allclose(s["dice_std"], dice.std(), rtol=1e-4, atol=1e-6)
        assert {"dsc30", "hd95_mean", "neg_jacobian_pct_mean", "sdlogj_mean", "runtime_s_mean",
                "dice_before_mean"} <= set(s)
        weights = np.asarray([[float(r[f"w_{d}"]) for d in DOMAINS] for r in rows])
        np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
        assert all(float(r["runtime_s"]) > 0 for r in rows)
    md = (out / "results.md").read_text()
    assert "| Training (%) | Abdominal | Brain | Hippocampus | Cardiac | Hip |" in md
    assert "*" not in md.split("\n\n")[1].splitlines()[2]  # no held-out cell in the run's row
    assert "Table" not in capsys.readouterr().err


def test_config_override_marks_held_out_domain(run, tmp_path):
    """--config with Hip held out: Hip is still evaluated, and starred in results.md."""
    workdir, data = run
    cfg = tmp_path / "loo_hip.py"
    cfg.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})\n"
        "from conftest import tiny_config\n"
        "def get_config(arg=None):\n"
        f"    c = tiny_config({str(data.parent)!r}, total_steps=2)\n"
        "    c.data.domains = [dict(d, held_out=d['name'] == arg) for d in c.data.domains]\n"
        "    return c\n")
    out = tmp_path / "eval"
    evaluate.main(["--workdir", str(workdir), "--config", f"{cfg}:Hip", "--out", str(out),
                   "--max-pairs", "1", "--name", "w/o Hip", "--learn2reg-sdlogj", "--quiet"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"] == ["Hip"] and summary["learn2reg_sdlogj"]
    assert all(s["pairs"] == 1 for s in summary["domains"].values())
    row = [l for l in (out / "results.md").read_text().splitlines() if l.startswith("| w/o Hip")]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[-1].endswith("*") and not any(c.endswith("*") for c in cells[1:-1])

    # experiments/make_table.py assembles such folders into one table, rows in argument order.
    spec = importlib.util.spec_from_file_location("make_table", REPO_ROOT / "experiments" /
                                                  "make_table.py")
    make_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_table)
    table = tmp_path / "table.md"
    assert make_table.main(["--out", str(table), f"w/o Hip={out}", f"again={out}"]) == 0
    lines = table.read_text().splitlines()
    assert lines[2].startswith("| w/o Hip |") and lines[2].endswith("* |")
    assert lines[3].startswith("| again |")
    assert make_table.main(["--out", str(table), f"x={tmp_path}"]) == 2


def test_table1_markdown_layout():
    res = {"all domains": {"Brain": {"dice_mean": 0.8, "dice_std": 0.05},
                           "Hip": {"dice_mean": 0.7, "dice_std": 0.1}},
           "w/o Brain": {"Brain": {"dice_mean": 0.612, "dice_std": 0.03},
                         "Hip": {"dice_mean": 0.69, "dice_std": float("nan")}}}
    md = evaluate.table1_markdown(res, {"w/o Brain": ["Brain"]}, domains=["Brain", "Hip", "Cardiac"])
    lines = md.splitlines()
    assert lines[0] == "| Training (%) | Brain | Hip | Cardiac |"
    assert lines[2] == "| all domains | 80.0 ± 5.0 | 70.0 ± 10.0 | – |"
    assert lines[3] == "| w/o Brain | 61.2 ± 3.0* | 69.0 | – |"
    assert "held out" in md
    plain = evaluate.table1_markdown(res, {}, percent=False)
    assert "| all domains | 0.800 ± 0.050 | 0.700 ± 0.100 |" in plain


@pytest.mark.parametrize("args, expected", [
    (["--workdir", "/nonexistent/run"], "/nonexistent/run does not exist"),
    ([], "give --workdir RUN or --checkpoint PATH"),
    (["--workdir", "/tmp", "--max-pairs", "-1"], "--max-pairs -1 is negative"),
])
def test_bad_input_one_line_exit_2(args, expected, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_bad_config_file_in_a_subprocess(run, tmp_path):
    workdir, _ = run
    proc = subprocess.run([sys.executable, "-m", "promptreg_jax.evaluate", "--workdir",
                           str(workdir), "--config", str(tmp_path / "missing.py")],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: --config {tmp_path / 'missing.py'}: file not found"
    assert "Traceback" not in proc.stderr

"""Reliability faults: bad CLI input, killed runs, corrupted checkpoints, a non-finite loss.

Every training run here uses ``conftest.tiny_config`` (or the identical CLI overrides in
``TINY_FLAGS``) with ``total_steps=4``, so they all share one compiled step through the cache.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_config
from promptreg_jax import checkpoint as ckpt_lib
from promptreg_jax import train

# The CLI spelling of conftest.tiny_config(root) (keep the two in step).
TINY_FLAGS = ("--config.data.synthetic.size=24", "--config.data.synthetic.subjects=4",
              "--config.data.image_size=(16,16,16)", "--config.data.pairs_per_domain=4",
              "--config.data.eval_pairs_per_domain=1", "--config.train.total_steps=4",
              "--config.train.log_every_steps=1", "--config.train.final_eval=False")


def _cli(root, workdir, *extra, config="demo.py:tiny", tiny=True):
    args = [sys.executable, "-m", "promptreg_jax.train", f"--config={REPO_ROOT}/configs/{config}",
            f"--workdir={workdir}"]
    if tiny:
        args += [f"--config.data.root={pathlib.Path(root) / 'synthetic'}", *TINY_FLAGS]
    return args + list(extra)


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("PROMPTREG_DATA_ROOT", None)
    return env


def _params(workdir):
    params, _, step = ckpt_lib.load_params(workdir)
    return step, {jax.tree_util.keystr(k): np.asarray(v)
                  for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-step tiny run: ``(root, final params)``."""
    root = tmp_path_factory.mktemp("faults")
    train.train_and_evaluate(tiny_config(root, checkpoint_every_steps=1), root / "reference")
    step, params = _params(root / "reference")
    assert step == 4
    return root, params


def test_bad_cli_input_is_one_clear_line(reference, tmp_path):
    root, _ = reference
    (tmp_path / "a_file").write_text("not a folder")
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    # A checkpoint from the tiny config, to be resumed with another width.
    incompatible = root / "reference"
    cases = {  # name: (args, words the error line must contain)
        "unknown option": (_cli(root, tmp_path / "w1", "--config.train.bogus_key=1"),
                           ["--config.train.bogus_key"]),
        "size not /8": ([a for a in _cli(root, tmp_path / "w2") if "image_size" not in a]
                        + ["--config.data.image_size=(20,20,20)"],
                        ["image_size", "multiple of 8"]),
        "workdir is a file": (_cli(root, tmp_path / "a_file"), ["a_file", "cannot be written"]),
        "workdir under a file": (_cli(root, tmp_path / "a_file" / "run"),
                                 ["a_file/run", "cannot be written"]),
        "incompatible ckpt": (_cli(root, incompatible, "--config.model.channels=8"),
                              ["incompatible", "channels"]),
        "no data root": (_cli(root, tmp_path / "w3", config="all_domains.py", tiny=False),
                         ["not found", "--config.data.root", "demo"]),
        "bad data root": (_cli(root, tmp_path / "w4", "--config.data.root=/nonexistent/data",
                               config="all_domains.py", tiny=False),
                          ["/nonexistent/data", "not found", "demo"]),
    }
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        cases["workdir read-only"] = (_cli(root, ro / "run"), ["read_only", "cannot be written"])
    procs = {name: subprocess.Popen(args, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    try:
        for name, p in procs.items():
            _, err = p.communicate(timeout=300)
            lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
            assert p.returncode != 0, (name, err[-2000:])
            assert "Traceback" not in err, (name, err[-2000:])
            assert len(lines) == 1, (name, err[-2000:])
            for word in cases[name][1]:
                assert word in lines[0], (name, word, lines[0])
    finally:
        ro.chmod(0o755)
    # The incompatible rerun left the checkpoints as they were.
    assert _params(incompatible)[1].keys() == reference[1].keys()
    assert ckpt_lib.Checkpointer(incompatible / "checkpoints").all_steps()[-1] == 4


def _kill_when(proc, ready, timeout=300):
    """SIGKILLs ``proc`` as soon as ``ready()``; returns False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("training subprocess timed out")


def test_killed_runs_resume_bit_identical(reference, tmp_path):
    root, expected = reference
    workdir = tmp_path / "run"
    ckpts = workdir / "checkpoints"
    args = _cli(root, workdir, "--config.train.checkpoint_every_steps=1")

    def entries():
        try:
            return os.listdir(ckpts)
        except OSError:
            return []

    def popen():
        return subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    # 1. Killed right after step 1's checkpoint was committed.
    assert _kill_when(popen(), lambda: "1" in entries())
    # 2. Killed while a checkpoint is being written (orbax's temporary folder exists). Where the
    # poll misses the write, it is killed right after the next commit instead.
    seen = []

    def writing_or_committed():
        seen[:] = entries()
        return any("tmp" in e for e in seen) or "2" in seen

    assert _kill_when(popen(), writing_or_committed)
    print(f"second kill with checkpoints/ = {sorted(seen)}", flush=True)
    # 3. Leftovers of a write killed even earlier: an orbax temporary folder with partial files.
    fake = ckpts / "3.orbax-checkpoint-tmp"
    (fake / "state").mkdir(parents=True, exist_ok=True)
    (fake / "state" / "partial").write_bytes(b"\0" * 10)
    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    step, params = _params(workdir)
    assert step == 4
    _assert_same(params, expected)


def test_corrupted_latest_checkpoints_fall_back(reference, tmp_path, caplog):
    root, expected = reference
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(tiny_config(root, checkpoint_every_steps=1, stop_at_step=3),
                                     workdir)
    assert first["step"] == 3
    ckpts = workdir / "checkpoints"
    # Step 3: every state file truncated to half; step 2: every state file overwritten.
    for f in (ckpts / "3" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for f in (ckpts / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage" * 7)
    with caplog.at_level("WARNING"):
        result = train.train_and_evaluate(tiny_config(root, checkpoint_every_steps=1), workdir)
    assert result["step"] == 4
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert any("step 3" in m for m in warned) and any("step 2" in m for m in warned), warned
    step, params = _params(workdir)
    assert step == 4
    _assert_same(params, expected)


class _Hooked:
    """A step (jitted, or compiled ahead as ``model.remat="auto"`` has the trainer do) that
    passes its third batch through ``hook`` first; other attributes are the step's own."""

    def __init__(self, fn, hook, calls):
        self.fn, self.hook, self.calls = fn, hook, calls

    def lower(self, *args):
        lowered = self.fn.lower(*args)
        return type("Lowered", (), {
            "compile": lambda _: _Hooked(lowered.compile(), self.hook, self.calls)})()

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __call__(self, state, batch):
        self.calls[0] += 1
        return self.fn(state, self.hook(batch) if self.calls[0] == 3 else batch)


def _on_third_step(make_train_fns, hook):
    """``make_train_fns`` whose step passes the third batch through ``hook`` first."""
    calls = [0]  # one count per run, whichever of the steps it made runs

    def wrapped(*a, **kw):
        init, step_fn, abstract, sharding = make_train_fns(*a, **kw)
        return init, _Hooked(step_fn, hook, calls), abstract, sharding
    return wrapped


def test_non_finite_loss_stops_and_resumes(reference, tmp_path, monkeypatch):
    """A NaN batch at step 3 (the compiled step itself unchanged): the run stops naming the step
    and the last good checkpoint; rerunning resumes from it and ends like an uninterrupted run."""
    root, expected = reference
    workdir = tmp_path / "run"
    real = train.make_train_fns
    monkeypatch.setattr(train, "make_train_fns", _on_third_step(
        real, lambda batch: dict(batch, moving=batch["moving"] * np.float32(np.nan))))
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(tiny_config(root, checkpoint_every_steps=1), workdir)
    msg = str(e.value)
    assert "non-finite loss at step 3" in msg and "last good checkpoint is step 2" in msg, msg
    assert ckpt_lib.Checkpointer(workdir / "checkpoints").all_steps() == [1, 2]
    monkeypatch.setattr(train, "make_train_fns", real)
    result = train.train_and_evaluate(tiny_config(root, checkpoint_every_steps=1), workdir)
    assert result["step"] == 4
    step, params = _params(workdir)
    assert step == 4
    _assert_same(params, expected)


def test_sigterm_checkpoints_the_current_step_and_resumes_bit_identical(reference, tmp_path,
                                                                       monkeypatch, capsys):
    """SIGTERM during step 3 with no checkpoint due (every 100 steps): the step finishes, step 3
    is saved, the run stops with Interrupted; the rerun ends like an uninterrupted run."""
    root, expected = reference
    workdir = tmp_path / "run"
    real = train.make_train_fns

    def sigterm(batch):
        os.kill(os.getpid(), signal.SIGTERM)  # handled between steps, not fatal
        return batch

    monkeypatch.setattr(train, "make_train_fns", _on_third_step(real, sigterm))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.Interrupted) as e:
        train.train_and_evaluate(tiny_config(root, checkpoint_every_steps=100), workdir)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is uninstalled
    assert e.value.signum == signal.SIGTERM
    assert str(e.value).startswith("interrupted by SIGTERM at step 3: checkpoint of step 3")
    assert ckpt_lib.Checkpointer(workdir / "checkpoints").all_steps() == [3]
    # The CLI boundary turns it into one line and exit code 128 + 15.
    from promptreg_jax.cli import run_cli

    def raise_it():
        raise e.value
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        run_cli(raise_it)
    assert code.value.code == 143
    assert capsys.readouterr().err.strip().splitlines() == [str(e.value)]
    monkeypatch.setattr(train, "make_train_fns", real)
    result = train.train_and_evaluate(tiny_config(root, checkpoint_every_steps=100), workdir)
    assert result["step"] == 4
    step, params = _params(workdir)
    assert step == 4
    _assert_same(params, expected)


def test_changed_optimiser_setting_is_named_not_taken_for_corruption(reference, tmp_path):
    root, _ = reference
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(root, stop_at_step=1), workdir)
    config = tiny_config(root)
    config.optim.amsgrad = False
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        train.train_and_evaluate(config, workdir)
    msg = str(e.value)
    assert "optim.amsgrad: checkpoint True vs now False" in msg and "init_from" in msg, msg
    assert ckpt_lib.Checkpointer(workdir / "checkpoints").all_steps() == [1]  # left as it was


def test_all_checkpoints_unreadable_is_an_error_not_a_restart(reference, tmp_path):
    root, _ = reference
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(root, stop_at_step=1), workdir)
    for f in (workdir / "checkpoints" / "1" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ckpt_lib.CheckpointError, match="every checkpoint in .* is unreadable"):
        train.train_and_evaluate(tiny_config(root), workdir)

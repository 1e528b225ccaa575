"""Registration CLI: outputs on the fixed file's grid, the world field's convention, orientation
consistency, pure instance optimisation, batch CSV, and one-line errors."""

import csv
import hashlib
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import REPO_ROOT
from tiny_checkpoint import tiny_checkpoint
from promptreg_jax import evaluate, model as model_lib, nifti_io, register
from promptreg_jax import registrar as registrar_mod
from promptreg_jax.data.preprocess import load_volume, prepare_image, prepare_label
from promptreg_jax.instance_opt import instance_optimize

LPS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run):
    """``(model, params, meta, step)``, loaded once; the same objects serve every test."""
    return model_lib.load_model(str(run[0]))


def _img(data_root, domain, name):
    return str(data_root / domain / "images" / f"{name}.nii.gz")


def _lab(data_root, domain, name):
    return str(data_root / domain / "labels" / f"{name}.nii.gz")


def _hash(tree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def test_register_cli_outputs_on_the_fixed_grid(run, tmp_path, capsys):
    """A cross-domain pair (different shapes and spacings), labels on both sides."""
    workdir, data = run
    fixed, moving = _img(data, "Brain", "brain_000"), _img(data, "Hip", "hip_001")
    out = tmp_path / "out"
    assert register.main(["--workdir", str(workdir), "--fixed", fixed, "--moving", moving,
                          "--fixed-label", _lab(data, "Brain", "brain_000"),
                          "--moving-label", _lab(data, "Hip", "hip_001"),
                          "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "prompt weights: Abdominal" in stdout and "-> resembles" in stdout
    ref, mov = nib.load(fixed), nib.load(moving)
    assert ref.shape != mov.shape
    name = "brain_000_hip_001"
    expect = {"warped": ref.shape, "warped_label": ref.shape, "jacdet": ref.shape,
              "disp": ref.shape + (3,), "disp_world": ref.shape + (1, 3)}
    imgs = {}
    for key, shape in expect.items():
        imgs[key] = nib.load(out / f"{key}_{name}.nii.gz")
        assert imgs[key].shape == shape, key
        np.testing.assert_allclose(imgs[key].affine, ref.affine, atol=1e-5)
    assert (out / f"qc_{name}.png").stat().st_size > 10_000
    world = imgs["disp_world"]
    assert int(world.header["intent_code"]) == 1007 and world.header.get_xyzt_units()[0] == "mm"
    assert world.get_data_dtype() == np.float32

    # The Learn2Reg field pulls the moving label onto the warped label: moving(y + u(y)).
    u = imgs["disp"].get_fdata()
    coords = np.moveaxis(np.indices(ref.shape) + np.moveaxis(u, -1, 0), 0, 0)
    pulled = ndimage.map_coordinates(np.asarray(nib.load(_lab(data, "Hip", "hip_001")).dataobj),
                                     coords, order=0, mode="constant", cval=0)
    assert np.mean(pulled == np.asarray(imgs["warped_label"].dataobj)) > 0.99
    # ... and the world field is the same map: A_m (y + u) = A_f y + RAS(d).
    y = np.moveaxis(np.indices(ref.shape), 0, -1).astype(np.float64)
    p = y @ ref.affine[:3, :3].T + ref.affine[:3, 3]
    q = (y + u) @ mov.affine[:3, :3].T + mov.affine[:3, 3]
    np.testing.assert_allclose(world.get_fdata()[:, :, :, 0, :] * LPS, q - p, atol=1e-3)
    rows = list(csv.DictReader(open(out / "registration.csv")))
    assert len(rows) == 1 and rows[0]["name"] == name and rows[0]["moving_modality"] == "ct"
    assert rows[0]["fixed_modality"] == "mr" and 0 <= float(rows[0]["dice"]) <= 1


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


def test_world_field_maps_fixed_points_to_moving_points_for_a_translation(tmp_path):
    """Fixed and moving in different, non-canonical orientations; moving = fixed + t (RAS mm)."""
    a_fixed = np.array([[0, 0, -3.0, 10], [-2.0, 0, 0, 5], [0, 1.5, 0, -7], [0, 0, 0, 1]])
    a_moving = np.array([[1.2, 0, 0, -4], [0, -1.1, 0, 9], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    fixed_path = _write(tmp_path / "f.nii.gz", rng.random((5, 6, 7), np.float32), a_fixed)
    moving_path = _write(tmp_path / "m.nii.gz", rng.random((6, 5, 8), np.float32), a_moving)
    fixed, moving = load_volume(fixed_path), load_volume(moving_path)
    t = np.array([3.0, -2.0, 4.5])
    # The map on canonical grids, as register builds it: fixed canonical voxel -> moving one.
    y_can = np.moveaxis(np.indices(fixed.data.shape), 0, -1).astype(np.float64)
    world = y_can @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    coords = (world + t - moving.affine[:3, 3]) @ np.linalg.inv(moving.affine[:3, :3]).T
    fields = nifti_io.field_outputs(coords, fixed, moving)
    nifti_io.save_world_displacement(fields.disp_world, nib.load(fixed_path), tmp_path / "w.nii.gz")

    img = nib.load(tmp_path / "w.nii.gz")
    assert img.shape == (5, 6, 7, 1, 3) and int(img.header["intent_code"]) == 1007
    assert img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(img.affine, a_fixed, atol=1e-6)
    d = img.get_fdata()[:, :, :, 0, :]
    np.testing.assert_allclose(d, np.broadcast_to(t * LPS, d.shape), atol=1e-4)
    # ITK: fixed physical point p (LPS) -> p + d(p) in the moving image.
    y = np.moveaxis(np.indices((5, 6, 7)), 0, -1).astype(np.float64)
    p_lps = (y @ a_fixed[:3, :3].T + a_fixed[:3, 3]) * LPS
    moving_vox = ((p_lps + d) * LPS - a_moving[:3, 3]) @ np.linalg.inv(a_moving[:3, :3]).T
    expected = (y @ a_fixed[:3, :3].T + a_fixed[:3, 3] + t - a_moving[:3, 3]) \
        @ np.linalg.inv(a_moving[:3, :3]).T
    np.testing.assert_allclose(moving_vox, expected, atol=1e-4)
    # The Learn2Reg field on the fixed file grid: y + u(y) is that moving file voxel.
    np.testing.assert_allclose(y + fields.disp_voxel, expected, atol=1e-4)
    np.testing.assert_allclose(fields.jacdet, 1.0, atol=1e-4)  # a translation keeps volumes


def _flip0(path, out):
    img = nib.load(path)
    n = img.shape[0]
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = n - 1
    return _write(out, np.asarray(img.dataobj)[::-1], img.affine @ flip)


def test_flipped_inputs_give_flipped_outputs(run, loaded, tmp_path):
    workdir, data = run
    model, params, meta, _ = loaded
    registrar = register.Registrar(model, params, meta, qc=False)
    files = [_img(data, "Brain", "brain_000"), _img(data, "Brain", "brain_001"),
             _lab(data, "Brain", "brain_000"), _lab(data, "Brain", "brain_001")]
    flipped = [_flip0(f, tmp_path / f"flip{i}.nii.gz") for i, f in enumerate(files)]
    a = registrar.register(register.PairSpec(*files), tmp_path / "a", "pair")
    b = registrar.register(register.PairSpec(*flipped), tmp_path / "b", "pair")
    assert a["dice"] == b["dice"] and a["prompt_weights"] == b["prompt_weights"]
    read = lambda d, k: nib.load(tmp_path / d / f"{k}_pair.nii.gz")  # noqa: E731
    for key in ("warped", "warped_label", "jacdet", "disp_world"):
        np.testing.assert_allclose(read("b", key).get_fdata(), read("a", key).get_fdata()[::-1],
                                   atol=1e-4, err_msg=key)
        assert not np.allclose(read("b", key).affine, read("a", key).affine)
    # Voxel units on the flipped grids: the flipped axis's component changes sign.
    ua, ub = read("a", "disp").get_fdata(), read("b", "disp").get_fdata()
    np.testing.assert_allclose(ub, ua[::-1] * np.array([-1.0, 1, 1]), atol=1e-4)


def test_instance_optimisation_lowers_the_loss_and_never_changes_the_params(
        run, loaded, tmp_path, monkeypatch, capsys):
    workdir, data = run
    model, params, meta, _ = loaded
    before = _hash(params)
    size = tuple(meta["model"]["image_size"])
    f, _ = prepare_image(_img(data, "Brain", "brain_000"), None, "mr", "paper", size)
    m, _ = prepare_image(_img(data, "Brain", "brain_001"), None, "mr", "paper", size)
    fl, _, _ = prepare_label(_lab(data, "Brain", "brain_000"), None, 13, None, size)
    ml, _, _ = prepare_label(_lab(data, "Brain", "brain_001"), None, 13, None, size)
    new, losses = instance_optimize(model, params, m[None, ..., None], f[None, ..., None], 3,
                                    lr=1e-4, moving_label=ml[None], fixed_label=fl[None],
                                    return_losses=True)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert _hash(new) != before and _hash(params) == before
    seen = []  # on_step: the parameters after each step, the last one those handed back
    again = instance_optimize(model, params, m[None, ..., None], f[None, ..., None], 3, lr=1e-4,
                              moving_label=ml[None], fixed_label=fl[None],
                              on_step=lambda k, p: seen.append((k, _hash(p))))
    assert [k for k, _ in seen] == [1, 2, 3] and seen[-1][1] == _hash(again) == _hash(new)
    assert len({h for _, h in seen}) == 3

    # Three pairs in one process through the CLI (--pairs, --io-steps): the first and the last
    # are the same pair, so any drift of the parameters would show in their outputs.
    pairs = tmp_path / "pairs.csv"
    b = lambda name: f"{data}/Brain/images/{name}.nii.gz"  # noqa: E731
    pairs.write_text("fixed,moving,fixed_label,moving_label\n"
                     f"{b('brain_000')},{b('brain_001')},{_lab(data, 'Brain', 'brain_000')},"
                     f"{_lab(data, 'Brain', 'brain_001')}\n"
                     f"{b('brain_001')},{b('brain_000')},{_lab(data, 'Brain', 'brain_001')},"
                     f"{_lab(data, 'Brain', 'brain_000')}\n"
                     f"{b('brain_000')},{b('brain_001')},{_lab(data, 'Brain', 'brain_000')},"
                     f"{_lab(data, 'Brain', 'brain_001')}\n")
    monkeypatch.setattr(model_lib, "load_model", lambda path, **kw: loaded)
    out = tmp_path / "batch"
    assert register.main(["--pairs", str(pairs), "--workdir", str(workdir), "--out", str(out),
                          "--io-steps", "2", "--io-lr", "1e-4", "--no-qc"]) == 0
    assert _hash(params) == before
    rows = list(csv.DictReader(open(out / "registration.csv")))
    assert [r["name"] for r in rows] == ["brain_000_brain_001_0", "brain_001_brain_000",
                                         "brain_000_brain_001_2"]
    assert all(r["io_steps"] == "2" for r in rows)
    first, last = (nib.load(out / f"disp_{r['name']}.nii.gz").get_fdata() for r in (rows[0], rows[2]))
    np.testing.assert_array_equal(first, last)
    plain = register.Registrar(model, params, meta, qc=False, guard=False).register(
        register.PairSpec(b("brain_000"), b("brain_001")), tmp_path / "plain", "p")
    assert not np.array_equal(nib.load(plain["files"]["disp"]).get_fdata(), first)


def test_4d_input_with_a_frame(run, loaded, tmp_path, monkeypatch):
    workdir, data = run
    src = nib.load(_img(data, "Brain", "brain_000"))
    stack = np.stack([np.asarray(src.dataobj)] * 2, axis=-1)
    four_d = _write(tmp_path / "cine.nii.gz", stack, src.affine)
    monkeypatch.setattr(model_lib, "load_model", lambda path, **kw: loaded)
    out = tmp_path / "out"
    register.main(["--workdir", str(workdir), "--fixed", four_d, "--fixed-frame", "1",
                   "--moving", _img(data, "Brain", "brain_001"), "--out", str(out), "--no-qc"])
    assert nib.load(out / "disp_cine_t1_brain_001.nii.gz").shape == src.shape + (3,)


@pytest.fixture(scope="module")
def bad_files(run, tmp_path_factory):
    _, data = run
    tmp = tmp_path_factory.mktemp("bad")
    src = nib.load(_img(data, "Brain", "brain_000"))
    four_d = _write(tmp / "cine.nii.gz", np.stack([np.asarray(src.dataobj)] * 2, -1), src.affine)
    no_col = tmp / "pairs.csv"
    no_col.write_text("fixed,moving_image\na.nii.gz,b.nii.gz\n")
    return {"4d": four_d, "csv": str(no_col), "brain": _img(data, "Brain", "brain_000"),
            "hip_label": _lab(data, "Hip", "hip_000"), "workdir": str(run[0])}


@pytest.mark.parametrize("case, expected", [
    ("missing", "/nonexistent/m.nii.gz: file not found (moving, command line)"),
    ("4d", "cine.nii.gz: 4D file (shape (24, 28, 24, 2)): choose a frame with --fixed-frame N"),
    ("label_grid", "label shape"),
    ("no_moving", "give --fixed and --moving (or --pairs pairs.csv)"),
    ("csv", "missing column(s) ['moving']"),
    ("checkpoint", "checkpoint path /nonexistent/run does not exist"),
])
def test_bad_input_one_line_exit_2(case, expected, bad_files, loaded, tmp_path, monkeypatch,
                                   capsys):
    monkeypatch.setattr(model_lib, "load_model",
                        lambda path, **kw: loaded if path != "/nonexistent/run"
                        else evaluate._run_folder(path))
    f = bad_files
    args = {"missing": ["--fixed", f["brain"], "--moving", "/nonexistent/m.nii.gz"],
            "4d": ["--fixed", f["4d"], "--moving", f["brain"]],
            "label_grid": ["--fixed", f["brain"], "--moving", f["brain"],
                           "--moving-label", f["hip_label"]],
            "no_moving": ["--fixed", f["brain"]],
            "csv": ["--pairs", f["csv"]],
            "checkpoint": ["--fixed", f["brain"], "--moving", f["brain"]]}[case]
    workdir = "/nonexistent/run" if case == "checkpoint" else f["workdir"]
    with pytest.raises(SystemExit) as e:
        register.main(args + ["--workdir", workdir, "--out", str(tmp_path), "--no-qc"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_missing_file_in_a_subprocess(bad_files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "promptreg_jax.register", "--workdir",
                           bad_files["workdir"], "--fixed", "/nonexistent/f.nii.gz", "--moving",
                           bad_files["brain"], "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: /nonexistent/f.nii.gz: file not found (fixed, command line)"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "promptreg_jax.register", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


def test_unreadable_newest_checkpoint_needs_a_flag_and_the_step_is_recorded(run, tmp_path):
    """Newest step truncated: an error naming the readable step (no traceback); with
    --allow-older-checkpoint that step is used, printed, and recorded in the CSV and headers."""
    import shutil
    workdir, data = run
    copy = tmp_path / "run"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    shutil.copytree(copy / "checkpoints" / "2", copy / "checkpoints" / "1")  # an older step
    for f in (copy / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    pair = ["--fixed", _img(data, "Brain", "brain_000"), "--moving", _img(data, "Brain", "brain_001"),
            "--workdir", copy, "--no-qc"]
    refused = _cli(*pair, "--out", tmp_path / "a")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    line, = refused.stderr.strip().splitlines()
    assert "newest checkpoint" in line and "step 1" in line and "--allow-older-checkpoint" in line
    assert not (tmp_path / "a").exists()
    used = _cli(*pair, "--out", tmp_path / "b", "--allow-older-checkpoint")
    assert used.returncode == 0, used.stderr[-3000:]
    assert "Traceback" not in used.stderr and "Event loop is closed" not in used.stderr
    assert "model: checkpoint step 1 of" in used.stdout
    row, = csv.DictReader(open(tmp_path / "b" / "registration.csv"))
    assert row["checkpoint_step"] == "1"
    header = nib.load(tmp_path / "b" / "disp_brain_000_brain_001.nii.gz").header
    assert b"step 1" in bytes(header["descrip"])


def test_output_folder_is_not_mixed_between_runs(run, loaded, tmp_path, monkeypatch, capsys):
    workdir, data = run
    monkeypatch.setattr(model_lib, "load_model", lambda path, **kw: loaded)
    out = tmp_path / "out"
    base = ["--workdir", str(workdir), "--out", str(out), "--no-qc"]
    a = ["--fixed", _img(data, "Brain", "brain_000"), "--moving", _img(data, "Brain", "brain_001"),
         "--fixed-label", _lab(data, "Brain", "brain_000"),
         "--moving-label", _lab(data, "Brain", "brain_001")]
    assert register.main(a + base) == 0
    first = sorted(p.name for p in out.iterdir())
    b = ["--fixed", _img(data, "Brain", "brain_001"), "--moving", _img(data, "Brain", "brain_000")]
    with pytest.raises(SystemExit) as e:
        register.main(b + base)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert sorted(p.name for p in out.iterdir()) == first  # untouched
    assert register.main(b + base + ["--overwrite"]) == 0
    rows = list(csv.DictReader(open(out / "registration.csv")))
    names = {p.name for p in out.iterdir()}
    assert [r["name"] for r in rows] == ["brain_001_brain_000"]
    assert not any("brain_000_brain_001" in n for n in names), names  # no stale label or field
    assert "disp_brain_001_brain_000.nii.gz" in names


def test_a_bad_pair_is_recorded_and_the_batch_goes_on(run, loaded, bad_files, tmp_path,
                                                      monkeypatch, capsys):
    workdir, data = run
    monkeypatch.setattr(model_lib, "load_model", lambda path, **kw: loaded)
    const = tmp_path / "constant.nii.gz"
    src = nib.load(_img(data, "Brain", "brain_000"))
    _write(const, np.full(src.shape, 7.0, np.float32), src.affine)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    b = lambda name: _img(data, "Brain", name)  # noqa: E731
    good = f"{b('brain_000')},{b('brain_001')}\n"
    # A missing or empty file anywhere: refused before any work, naming the file.
    for bad, words in ((f"{b('brain_000')},/nonexistent/x.nii.gz\n", "file not found"),
                       (f"{b('brain_000')},{empty}\n", "empty file (0 bytes)")):
        pairs = tmp_path / "pairs.csv"
        pairs.write_text("fixed,moving\n" + good + bad)
        with pytest.raises(SystemExit) as e:
            register.main(["--pairs", str(pairs), "--workdir", str(workdir),
                           "--out", str(tmp_path / "refused"), "--no-qc", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
        assert not (tmp_path / "refused").exists()
    # A pair that fails only once read (constant image): recorded, the others registered.
    pairs.write_text("fixed,moving\n" + good + f"{b('brain_000')},{const}\n" + good)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        register.main(["--pairs", str(pairs), "--workdir", str(workdir), "--out", str(out),
                       "--no-qc", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "1 of 3 pairs failed" in err[-1]
    rows = list(csv.DictReader(open(out / "registration.csv")))
    assert [bool(r["error"]) for r in rows] == [False, True, False]
    assert "constant image" in rows[1]["error"]
    assert (out / f"disp_{rows[2]['name']}.nii.gz").exists()


def test_a_folding_field_is_warned_about(run, loaded, tmp_path, capsys):
    """A field that folds (du_x/dx = -1.5, so J < 0) gets a warning line; a smooth one none."""
    _, data = run
    model, params, meta, _ = loaded
    registrar = register.Registrar(model, params, meta, qc=False, step=2, guard=False)
    size = registrar.image_size
    x = np.arange(size[0], dtype=np.float32)[:, None, None]
    folding = np.zeros((1, *size, 3), np.float32)
    folding[0, ..., 0] = -1.5 * (x - size[0] / 2)
    weights = np.full((1, len(registrar.domains)), 1.0 / len(registrar.domains), np.float32)
    pair = register.PairSpec(_img(data, "Brain", "brain_000"), _img(data, "Brain", "brain_001"))
    for flow, warned in ((np.zeros_like(folding), False), (folding, True)):
        registrar.predict = lambda p, m, f, flow=flow: (flow, weights)
        out = tmp_path / f"o{int(warned)}"
        (row,) = registrar_mod.register_pairs(registrar, [pair], out, progress=False, echo=print)
        text = capsys.readouterr().out
        assert ("warning:" in text and "fold" in text) == warned, text
        assert (row["neg_jacobian_pct"] > 50) == warned


def test_qc_figure_with_a_cjk_file_name_warns_nothing(tmp_path):
    import warnings
    from promptreg_jax.qc import qc_figure
    rng = np.random.default_rng(0)
    vol = rng.random((12, 14, 10)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qc_figure(tmp_path / "qc.png", vol, vol, vol, np.zeros((12, 14, 10, 3), np.float32),
                  (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), title="脑部扫描_000 <- 脑部扫描_001")
    assert (tmp_path / "qc.png").stat().st_size > 1000
    assert not [w for w in caught if "lyph" in str(w.message)], [str(w.message) for w in caught]


def test_guard_hands_back_no_registration_when_mind_gets_worse(run, loaded, tmp_path):
    """A harmful field (a large shift) is replaced by no registration; MIND before/after are
    recorded, and after <= before always."""
    _, data = run
    model, params, meta, _ = loaded
    registrar = register.Registrar(model, params, meta, qc=False, step=2, guard=True)
    size = registrar.image_size
    shift = np.zeros((1, *size, 3), np.float32)
    shift[..., 0] = size[0] / 3  # a third of the volume: far worse than no registration
    weights = np.full((1, len(registrar.domains)), 1.0 / len(registrar.domains), np.float32)
    registrar.predict = lambda p, m, f: (shift, weights)
    pair = register.PairSpec(_img(data, "Brain", "brain_000"), _img(data, "Brain", "brain_001"))
    (row,) = registrar_mod.register_pairs(registrar, [pair], tmp_path / "o", progress=False,
                                          echo=lambda *_: None)
    assert row["guard"] and row["mind_after"] == row["mind_before"]
    disp = nib.load(row["files"]["disp"]).get_fdata()
    assert np.abs(disp).max() < 1.5  # the box map of two same-size images: (near) identity


def test_field_io_compose_mode_writes_a_consistent_field(run, loaded, tmp_path):
    """``--field-io-init compose`` (refine on top of the network's field; warm is the default,
    covered by the CLI test above): the written field pulls the moving label onto the written
    warped label, across grids of different shapes. A bad mode is one clear error."""
    _, data = run
    model, params, meta, _ = loaded
    registrar = register.Registrar(model, params, meta, qc=False, field_io=True, guard=False,
                                   field_io_options={"init_mode": "compose",
                                                     "steps": (2, 2, 2)})
    pair = register.PairSpec(_img(data, "Brain", "brain_000"), _img(data, "Hip", "hip_001"),
                             _lab(data, "Brain", "brain_000"), _lab(data, "Hip", "hip_001"))
    row = registrar.register(pair, tmp_path, "c")
    u = nib.load(row["files"]["disp"]).get_fdata()
    coords = np.indices(u.shape[:3]) + np.moveaxis(u, -1, 0)
    pulled = ndimage.map_coordinates(np.asarray(nib.load(pair.moving_label).dataobj), coords,
                                     order=0, mode="constant", cval=0)
    assert np.mean(pulled == np.asarray(nib.load(row["files"]["warped_label"]).dataobj)) > 0.99
    with pytest.raises(ValueError, match="init_mode must be 'warm' or 'compose'"):
        register.Registrar(model, params, meta, field_io_options={"init_mode": "start"})


def test_field_io_options_from_the_command_line():
    """``--field-io-*`` flags reach ``optimize_field``'s keywords; unset ones keep its defaults."""
    base = ["--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--workdir", "w", "--out", "o"]
    parse = register._parser().parse_args
    assert register.field_io_options(parse(base)) == {"init_mode": "warm"}
    opts = register.field_io_options(parse(base + ["--field-io-boundary", "zeros",
                                                   "--field-io-smooth", "1.5"]))
    assert opts == {"init_mode": "warm", "boundary": "zeros", "smooth": 1.5}
    with pytest.raises(SystemExit):
        parse(base + ["--field-io-boundary", "reflect"])

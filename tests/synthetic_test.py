"""The synthetic multi-domain data set: layout, determinism, correspondence, CLI errors."""

import itertools
import json
import os

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from promptreg_jax.data import domains_from_config, ensure_synthetic, read_pairs
from promptreg_jax.data import synthetic


def _dice(a, b, num_classes):
    scores = [2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c))
              for c in range(1, num_classes) if (a == c).any() or (b == c).any()]
    return float(np.mean(scores))


@pytest.mark.parametrize("key", synthetic.DOMAINS)
def test_subjects_correspond_but_differ(key):
    size = 32
    subjects = [synthetic.make_subject(key, size, 0, i)[0] for i in range(3)]
    n = synthetic.num_classes(key)
    if key == "cardiac":  # each pair is ES -> ED of one subject
        pairs = [(s["es"][1], s["ed"][1]) for s in subjects]
    else:
        pairs = list(itertools.combinations([s[""][1] for s in subjects], 2))
    dice = np.mean([_dice(a, b, n) for a, b in pairs])
    assert 0.4 < dice < 0.9, dice  # room for registration to improve
    labels = next(iter(subjects[0].values()))[1]
    assert labels.dtype == np.uint8 and labels.max() == n - 1
    image = next(iter(subjects[0].values()))[0]
    assert image.dtype == np.int16 and image.std() > 0
    if synthetic.SPECS[key].modality == "ct":
        assert image.min() < -900  # air in Hounsfield units


@pytest.mark.parametrize("key", synthetic.DOMAINS)
def test_subject_maps_are_invertible(key):
    p, q = synthetic.subject_map(key, 24, 0, 1)
    grads = [np.gradient(q[a], *[np.linspace(-1, 1, n) for n in q[a].shape]) for a in range(3)]
    jac = np.stack([np.stack(g, -1) for g in grads], -2)  # (..., 3, 3): d q_a / d p_b
    assert np.linalg.det(jac).min() > 0.2


def test_appearance_varies_per_subject():
    """Contrast per tissue, blur, noise, gamma and bias are drawn per subject, deterministically,
    within their documented ranges; brain and hippocampus have some inverted-contrast subjects."""
    looks = [synthetic.appearance("brain", 0, i) for i in range(32)]
    assert synthetic.appearance("brain", 0, 3)["gamma"] == looks[3]["gamma"]  # deterministic
    base = np.asarray([m for _, m, _ in synthetic.SPECS["brain"].tissues.values()])
    for look in looks:
        ratio = look["means"][1:] / (1.0 - base[1:] if look["inverted"] else base[1:])
        assert np.all((ratio >= 0.8) & (ratio <= 1.2)) and look["means"][0] == 0.0, ratio
        assert 0.7 <= look["gamma"] <= 1.4 and 0.4 <= look["blur"] <= 1.1
        assert 0.1 <= look["bias"] <= 0.45 and 300 <= look["gain"] <= 1200
    assert 0.05 < np.mean([lk["inverted"] for lk in looks]) < 0.4  # p = 0.2
    assert np.std([lk["blur"] for lk in looks]) > 0.1 and np.std([lk["gamma"] for lk in looks]) > 0.1
    ct = [synthetic.appearance("abdomen", 0, i) for i in range(8)]
    assert not any(lk["inverted"] for lk in ct) and all(lk["gamma"] == 1.0 for lk in ct)
    assert all(lk["means"][0] == -1000.0 for lk in ct)  # air stays air
    liver = [lk["means"][list(synthetic.SPECS["abdomen"].tissues).index("liver")] for lk in ct]
    assert 3 < np.std(liver) < 30  # N(0, 15) HU per subject around 100 HU


def test_inverted_contrast_in_the_image():
    """In an inverted brain subject the ventricles (labels 5, 6) are brighter than the white
    matter (3, 4); in a plain one darker."""
    flags = [synthetic.appearance("brain", 0, i)["inverted"] for i in range(8)]
    for i in (flags.index(True), flags.index(False)):
        image, labels = synthetic.make_subject("brain", 32, 0, i)[0][""]
        ventricles = image[np.isin(labels, (5, 6))].mean()
        wm = image[np.isin(labels, (3, 4))].mean()
        assert (ventricles > 1.5 * wm) if flags[i] else (wm > 1.5 * ventricles), (i, ventricles, wm)


def test_deformation_strength_varies():
    """Subjects differ from their pose (S p + t) by deformations of varied size: the largest
    RMS local displacement is well above the smallest among 12 subjects."""
    rms = []
    for i in range(12):
        p, q = synthetic.subject_map("brain", 24, 0, i)
        # The affine part by least squares per axis, the rest is the local deformation.
        a = np.stack([p[0].ravel(), p[1].ravel(), p[2].ravel(), np.ones(p[0].size)], 1)
        res = [q[k].ravel() - a @ np.linalg.lstsq(a, q[k].ravel(), rcond=None)[0]
               for k in range(3)]
        rms.append(float(np.sqrt(np.mean(np.sum(np.square(res), 0)))))
    assert max(rms) > 1.8 * min(rms), rms


def test_generate_layout_and_determinism(tmp_path):
    entries = synthetic.generate(str(tmp_path / "a"), size=16, subjects=3, seed=0)
    assert [e["name"] for e in entries] == ["Brain", "Abdominal", "Hippocampus", "Cardiac", "Hip"]
    summary = json.loads((tmp_path / "a/domains.json").read_text())
    assert [d["num_classes"] for d in summary["domains"]] == [13, 5, 3, 4, 4]
    cfg = ml_collections.ConfigDict({"data": {"domains": entries}})
    for domain in domains_from_config(cfg.data):
        train, test = read_pairs(domain)  # the authors' csv layout, read by the real reader
        assert train and test and domain.task_id >= 0
        if domain.name == "Cardiac":
            assert all(p.moving_image.endswith("_es.nii.gz") and p.fixed_image.endswith("_ed.nii.gz")
                       for p in train + test)
    synthetic.generate(str(tmp_path / "b"), size=16, subjects=3, seed=0, domains=["hip"])
    synthetic.generate(str(tmp_path / "c"), size=16, subjects=3, seed=1, domains=["hip"])
    name = "Hip/images/hip_001.nii.gz"
    load = lambda d: np.asarray(nib.load(str(tmp_path / d / name)).dataobj)  # noqa: E731
    np.testing.assert_array_equal(load("a"), load("b"))  # other domains do not shift the stream
    assert not np.array_equal(load("a"), load("c"))


def test_ensure_synthetic_regenerates_only_when_incomplete(tmp_path, capsys):
    out = str(tmp_path / "syn")
    entries = ensure_synthetic(out, size=16, subjects=2, seed=0, domains=("hippocampus",))
    assert f"generating the synthetic data set (size 16, 2 subjects per domain) into {out}" \
        in capsys.readouterr().err  # says where it writes
    image = os.path.join(entries[0]["root"], "images", "hippocampus_000.nii.gz")
    stamp = os.stat(image).st_mtime_ns
    assert ensure_synthetic(out, size=16, subjects=2, seed=0, domains=("hippocampus",)) == entries
    assert "generating" not in capsys.readouterr().err
    assert os.stat(image).st_mtime_ns == stamp
    os.remove(os.path.join(out, ".complete.json"))  # as if a generation had been killed
    os.remove(image)
    ensure_synthetic(out, size=16, subjects=2, seed=0, domains=("hippocampus",))
    assert os.path.exists(image)
    # Data written by an older generator is regenerated, not reused.
    marker = os.path.join(out, ".complete.json")
    with open(marker) as f:
        args = json.load(f)
    assert args["version"] == synthetic.GENERATOR_VERSION
    with open(marker, "w") as f:
        json.dump(dict(args, version=synthetic.GENERATOR_VERSION - 1), f)
    capsys.readouterr()
    ensure_synthetic(out, size=16, subjects=2, seed=0, domains=("hippocampus",))
    assert "generating" in capsys.readouterr().err
    with open(marker) as f:
        assert json.load(f)["version"] == synthetic.GENERATOR_VERSION


@pytest.mark.parametrize("args, needle", [
    (["--size", "8"], "--size 8 is below 16"),
    (["--subjects", "1"], "--subjects 1 is below 2"),
    (["--domains", "brain,lung"], "unknown domain(s) ['lung']"),
    (["--size", "abc"], "invalid int value"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["--out", str(tmp_path)] + args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_cli_unwritable_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["--out", str(tmp_path / "file" / "sub")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is not writable" in err and err.count("\n") == 1

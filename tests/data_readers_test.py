"""Domains from config and every reader, on tiny NIfTI files written in the real layouts."""

import csv
import json
import os

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from promptreg_jax.data import DataError, Domain, domains_from_config, load_volume, read_pairs


def _nii(path, shape=(8, 9, 7), seed=0, label=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 3, shape).astype(np.uint8) if label else rng.normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _domain(root, reader, held_out=False, **kw):
    return Domain(name="d", modality="mr", reader=reader, root=str(root), num_classes=3,
                  task_id=-1 if held_out else 0, held_out=held_out, **kw)


# Domains ------------------------------------------------------------------------------------------
def _config(domains, root=""):
    cfg = ml_collections.ConfigDict()
    cfg.data = ml_collections.ConfigDict()
    cfg.data.root = root
    cfg.data.domains = domains
    return cfg.data


def test_domains_task_ids_roots_and_label_map(tmp_path, monkeypatch):
    for name in ("A", "B", "C"):
        (tmp_path / name).mkdir()
    monkeypatch.delenv("PROMPTREG_DATA_ROOT", raising=False)
    doms = domains_from_config(_config([
        dict(name="A", modality="ct", reader="csv", num_classes=5, label_map={"6": 4, "1": 1}),
        dict(name="B", modality="mr", reader="msd", num_classes=3, held_out=True),
        dict(name="C", modality="mr", reader="csv", root=str(tmp_path / "C"), num_classes=4),
    ], root=str(tmp_path)))
    assert [(d.name, d.task_id, d.held_out) for d in doms] == [("A", 0, False), ("B", -1, True),
                                                               ("C", 1, False)]
    assert doms[0].root == str(tmp_path / "A") and doms[0].label_map_dict == {1: 1, 6: 4}
    assert hash(doms[0]) != hash(doms[2])  # frozen, usable as dict keys
    monkeypatch.setenv("PROMPTREG_DATA_ROOT", str(tmp_path))
    (d,) = domains_from_config(_config([dict(name="B", modality="mr", reader="csv", num_classes=3)]))
    assert d.root == str(tmp_path / "B")


@pytest.mark.parametrize("entry, needle", [
    (dict(name="A", modality="mr", reader="nifti", num_classes=3), "reader 'nifti' unknown"),
    (dict(name="A", modality="us", reader="csv", num_classes=3), "modality 'us' unknown"),
    (dict(name="A", modality="mr", reader="csv", num_classes=3, label_map={"1": 7}), "label_map"),
    (dict(name="Nope", modality="mr", reader="csv", num_classes=3), "PROMPTREG_DATA_ROOT"),
])
def test_domain_config_errors(tmp_path, entry, needle):
    (tmp_path / "A").mkdir()
    with pytest.raises(DataError, match=needle) as err:
        domains_from_config(_config([entry], root=str(tmp_path)))
    assert "\n" not in str(err.value)
    if entry["name"] == "Nope":
        assert str(tmp_path / "Nope") in str(err.value) and "configs/demo.py" in str(err.value)


# csv ----------------------------------------------------------------------------------------------
def test_csv_layout(tmp_path):
    for i in range(3):
        _nii(tmp_path / f"img/s{i}.nii.gz", seed=i)
        _nii(tmp_path / f"seg/s{i}.nii.gz", seed=i, label=True)
    header = ["moving_image", "moving_label", "fixed_image", "fixed_label"]
    _csv(tmp_path / "csv/train.csv", header, [["img/s0.nii.gz", "seg/s0.nii.gz", "img/s1.nii.gz", ""]])
    _csv(tmp_path / "csv/test.csv", header,
         [["img/s2.nii.gz", "seg/s2.nii.gz", "img/s1.nii.gz", "seg/s1.nii.gz"]])
    train, test = read_pairs(_domain(tmp_path, "csv"))
    assert train[0].moving_image == str(tmp_path / "img/s0.nii.gz")
    assert train[0].fixed_label is None and train[0].moving_frame is None
    assert test[0].fixed_label == str(tmp_path / "seg/s1.nii.gz")


def test_csv_errors(tmp_path):
    _csv(tmp_path / "csv/train.csv", ["moving_image", "fixed_image", "fixed_label"], [["a", "b", ""]])
    with pytest.raises(DataError, match="moving_label") as err:
        read_pairs(_domain(tmp_path, "csv"))
    assert str(tmp_path / "csv/train.csv") in str(err.value)
    _csv(tmp_path / "csv/train.csv", ["moving_image", "moving_label", "fixed_image", "fixed_label"],
         [["img/a.nii.gz", "", "img/b.nii.gz", ""]])
    with pytest.raises(DataError, match="file not found") as err:
        read_pairs(_domain(tmp_path, "csv"))
    assert str(tmp_path / "img/a.nii.gz") in str(err.value)


# learn2reg ----------------------------------------------------------------------------------------
def _l2r(root, pairings="unpaired", drop=None):
    entries = []
    for i in range(1, 7):
        name = f"T_{i:04d}_0000.nii.gz"
        _nii(root / "imagesTr" / name, seed=i)
        _nii(root / "labelsTr" / name, seed=i, label=True)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    js = {"name": "T", "pairings": pairings, "training": entries[:5],  # case 6: label by path
          "registration_val": [{"fixed": "./imagesTr/T_0005_0000.nii.gz",
                                "moving": "./imagesTr/T_0006_0000.nii.gz"}],
          "training_paired_images": [{"fixed": "./imagesTr/T_0001_0000.nii.gz",
                                      "moving": "./imagesTr/T_0002_0000.nii.gz"}]}
    js.pop(drop, None)
    (root / "T_dataset.json").write_text(json.dumps(js))


def test_learn2reg_unpaired_and_paired(tmp_path):
    _l2r(tmp_path)
    train, val = read_pairs(_domain(tmp_path, "learn2reg"))
    assert len(train) == 4 * 3  # ordered pairs among cases 1-4 (5 and 6 are validation)
    used = {p.moving_image for p in train} | {p.fixed_image for p in train}
    assert not any("0005" in u or "0006" in u for u in used)
    assert all(p.moving_label.replace("labelsTr", "imagesTr") == p.moving_image for p in train)
    (v,) = val
    assert v.moving_image.endswith("imagesTr/T_0006_0000.nii.gz")
    assert v.moving_label == str(tmp_path / "labelsTr/T_0006_0000.nii.gz")  # derived from the path
    assert v.fixed_label == str(tmp_path / "labelsTr/T_0005_0000.nii.gz")
    _l2r(tmp_path, pairings="paired")
    train, _ = read_pairs(_domain(tmp_path, "learn2reg"))
    assert [(os.path.basename(p.moving_image), os.path.basename(p.fixed_image)) for p in train] == [
        ("T_0002_0000.nii.gz", "T_0001_0000.nii.gz")]


def test_learn2reg_missing_key(tmp_path):
    _l2r(tmp_path, drop="registration_val")
    with pytest.raises(DataError, match="'registration_val'") as err:
        read_pairs(_domain(tmp_path, "learn2reg"))
    assert str(tmp_path / "T_dataset.json") in str(err.value)


# msd ----------------------------------------------------------------------------------------------
def _msd(root, n):
    entries = []
    for i in range(n):
        _nii(root / f"imagesTr/hippocampus_{i:03d}.nii.gz", seed=i)
        _nii(root / f"labelsTr/hippocampus_{i:03d}.nii.gz", seed=i, label=True)
        entries.append({"image": f"./imagesTr/hippocampus_{i:03d}.nii.gz",
                        "label": f"./labelsTr/hippocampus_{i:03d}.nii.gz"})
    entries.append({"image": "./imagesTr/._hippocampus_000.nii.gz",
                    "label": "./labelsTr/._hippocampus_000.nii.gz"})  # macOS junk, never read
    (root / "dataset.json").write_text(json.dumps({"name": "Hippocampus", "training": entries}))


def test_msd_split(tmp_path):
    _msd(tmp_path, 5)
    train, val = read_pairs(_domain(tmp_path, "msd"))
    assert len(train) == 3 * 2 and len(val) == 1  # last 2 subjects evaluate
    assert val[0].fixed_image.endswith("hippocampus_003.nii.gz")
    assert val[0].moving_image.endswith("hippocampus_004.nii.gz")
    assert all("._" not in p.moving_image for p in train + val)
    _, val = read_pairs(_domain(tmp_path, "msd", held_out=True))
    assert len(val) == 4


def test_msd_too_few_subjects(tmp_path):
    _msd(tmp_path, 1)
    with pytest.raises(DataError, match="at least two") as err:
        read_pairs(_domain(tmp_path, "msd"))
    assert str(tmp_path / "dataset.json") in str(err.value)


# mnms ---------------------------------------------------------------------------------------------
def _mnms(root, columns=("External code", "VendorName", "ED", "ES")):
    rows = [["0", "AAA111", "Philips", "0", "2"], ["1", "BBB222", "Siemens", "1", "3"],
            ["2", "CCC333", "GE", "0", "2"], ["3", "DDD444", "Canon", "2", "0"]]
    _csv(root / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv", [""] + list(columns), rows)
    for folder, code, gt in (("Training/Labeled", "AAA111", True), ("Training/Labeled", "BBB222", True),
                             ("Training/Unlabeled", "CCC333", False), ("Validation", "DDD444", True)):
        img = np.stack([np.full((6, 7, 3), t + 1.0, np.float32) for t in range(4)], -1)
        img[0, 0, 0] = 0.0
        nib.save(nib.Nifti1Image(img, np.eye(4)), _nii(root / folder / code / f"{code}_sa.nii.gz"))
        if gt:
            nib.save(nib.Nifti1Image((img > 0).astype(np.uint8), np.eye(4)),
                     _nii(root / folder / code / f"{code}_sa_gt.nii.gz"))


def test_mnms_es_to_ed_frames(tmp_path):
    _mnms(tmp_path)
    train, val = read_pairs(_domain(tmp_path, "mnms"))
    assert [(os.path.basename(p.moving_image), p.moving_frame, p.fixed_frame) for p in train] == [
        ("AAA111_sa.nii.gz", 2, 0), ("BBB222_sa.nii.gz", 3, 1)]
    assert train[0].moving_label.endswith("AAA111_sa_gt.nii.gz")
    assert [(p.moving_frame, p.fixed_frame) for p in val] == [(0, 2)]
    vol = load_volume(train[1].moving_image, train[1].moving_frame)
    assert vol.data.shape == (6, 7, 3) and vol.data[1, 1, 1] == 4.0  # frame 3 of the 4D file
    with pytest.raises(DataError, match="4D file"):
        load_volume(train[1].moving_image)


def test_mnms_missing_column(tmp_path):
    _mnms(tmp_path, columns=("External code", "VendorName", "ED", "ESX"))
    with pytest.raises(DataError, match="'ES'") as err:
        read_pairs(_domain(tmp_path, "mnms"))
    assert "Dataset_information" in str(err.value)


# files --------------------------------------------------------------------------------------------
def test_files_suffix_glob_and_csv(tmp_path):
    for i in range(4):
        _nii(tmp_path / f"vols/c{i}.nii.gz", seed=i)
        _nii(tmp_path / f"vols/c{i}_seg.nii.gz", seed=i, label=True)
        _nii(tmp_path / f"labs/c{i}.nii.gz", seed=i, label=True)
    train, val = read_pairs(_domain(tmp_path, "files", image_glob="vols/*.nii.gz", label_suffix="_seg"))
    assert len(train) == 2 and len(val) == 1
    assert train[0].moving_label == train[0].moving_image.replace(".nii.gz", "_seg.nii.gz")
    train, _ = read_pairs(_domain(tmp_path, "files", image_glob="vols/c?.nii.gz",
                                  label_glob="labs/*.nii.gz"))
    assert (train[0].moving_label, train[0].fixed_label) == (str(tmp_path / "labs/c0.nii.gz"),
                                                             str(tmp_path / "labs/c1.nii.gz"))
    _csv(tmp_path / "list.csv", ["image", "label"],
         [[f"vols/c{i}.nii.gz", f"labs/c{i}.nii.gz" if i else ""] for i in range(4)])
    train, _ = read_pairs(_domain(tmp_path, "files", csv="list.csv"))
    assert train[0].moving_label is None and train[1].moving_label is not None
    os.remove(tmp_path / "vols/c2_seg.nii.gz")
    with pytest.raises(DataError, match="label of c2.nii.gz not found") as err:
        read_pairs(_domain(tmp_path, "files", image_glob="vols/*.nii.gz", label_suffix="_seg"))
    assert str(tmp_path / "vols/c2_seg.nii.gz") in str(err.value)

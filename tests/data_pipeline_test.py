"""Preprocessing checks, the volume cache and the grain loader, on tiny volumes."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from promptreg_jax.data import (DataError, Domain, Pair, VolumeCache, iterate_eval_pairs,
                                load_image, load_label, load_volume, loader_throughput,
                                make_train_loader, normalize, read_pairs)
from promptreg_jax.data import preprocess, synthetic
from promptreg_jax.data.synthetic import config_entries

SIZE = (16, 16, 16)


def _save(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


# Preprocessing ------------------------------------------------------------------------------------
def test_load_reorients_to_canonical(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = np.diag([-2.0, 1.0, 3.0, 1.0])  # x runs right-to-left in the file
    vol = load_volume(_save(tmp_path / "a.nii.gz", data, affine))
    np.testing.assert_array_equal(vol.data, data[::-1])
    assert np.all(np.diag(vol.affine)[:3] > 0) and vol.spacing == (2.0, 1.0, 3.0)
    np.testing.assert_array_equal(vol.original_affine, affine)
    meta = vol.meta(str(tmp_path / "a.nii.gz"), None)
    assert meta["original_shape"] == [4, 5, 6] and meta["file_shape"] == [4, 5, 6]


def _bad_files(tmp_path):
    ok = np.random.default_rng(0).normal(size=(6, 6, 6)).astype(np.float32)
    good = _save(tmp_path / "good.nii.gz", ok)
    raw = open(good, "rb").read()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "plain.nii.gz").write_bytes(b"not gzip at all")
    (tmp_path / "text.nii").write_bytes(b"hello" * 100)
    nib.save(nib.MGHImage(ok, np.eye(4)), str(tmp_path / "vol.mgz"))
    nan = ok.copy()
    nan[1, 1, 1] = np.nan
    return {
        "missing.nii.gz": "file not found",
        "trunc.nii.gz": "truncated",
        "plain.nii.gz": "not gzip-compressed",
        "text.nii": "not a readable NIfTI",
        "vol.mgz": "not NIfTI",
        _save(tmp_path / "four.nii.gz", np.stack([ok, ok], -1)): "4D file",
        _save(tmp_path / "nan.nii.gz", nan): "1 NaN/inf voxels",
        _save(tmp_path / "const.nii.gz", np.ones((6, 6, 6), np.float32)): "constant image",
    }


def test_image_errors_name_the_file(tmp_path):
    for name, needle in _bad_files(tmp_path).items():
        path = os.path.join(tmp_path, name)
        with pytest.raises(DataError, match=needle) as err:
            load_image(path)
        assert str(err.value).startswith(path + ":") and "\n" not in str(err.value), name


def test_label_checks(tmp_path):
    lab = np.zeros((6, 6, 6), np.int16)
    lab[1:3, 1:3, 1:3] = 6
    path = _save(tmp_path / "l.nii.gz", lab)
    with pytest.raises(DataError, match="label value 6 above num_classes - 1 = 4"):
        load_label(path, None, 5)
    assert load_label(path, None, 5, {6: 4}).data.max() == 4
    with pytest.raises(DataError, match="empty label map"):
        load_label(path, None, 5, {1: 1})  # 6 is not mapped -> background
    with pytest.raises(DataError, match="empty label map"):
        load_label(_save(tmp_path / "z.nii.gz", np.zeros((6, 6, 6), np.uint8)), None, 3)
    with pytest.raises(DataError, match="non-integer label values") as err:
        load_label(_save(tmp_path / "f.nii.gz", lab + 0.5), None, 5)
    assert str(tmp_path / "f.nii.gz") in str(err.value)


def test_normalize_modes():
    ct = np.array([-2000.0, -1000.0, 0.0, 500.0, 3000.0], np.float32)
    np.testing.assert_allclose(normalize(ct, "ct", "paper"), [0, 0, 0.5, 0.75, 1])
    ct_ref = np.array([-500.0, 0.0, 2000.0], np.float32)  # clip to 1024, then min-max
    np.testing.assert_allclose(normalize(ct_ref, "ct", "reference"), [0, 500 / 1524, 1], rtol=1e-6)
    mr = np.arange(1000, dtype=np.float32)
    p1, p99 = np.percentile(mr, [1, 99])
    paper = normalize(mr, "mr", "paper")
    np.testing.assert_allclose(paper[[0, 500, 999]], [0, 500 / p99, 1], rtol=1e-5)
    ref = normalize(mr, "mr", "reference")
    np.testing.assert_allclose(ref[[0, 500, 999]], [0, (500 - p1) / (p99 - p1), 1], rtol=1e-5)
    assert paper.dtype == ref.dtype == np.float32


# A tiny multi-domain data set and its cache ---------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    synthetic.generate(str(root), size=16, subjects=4, seed=0,
                       domains=("brain", "hippocampus", "cardiac"))
    domains = [Domain(name=e["name"], modality=e["modality"], reader="csv", root=e["root"],
                      num_classes=e["num_classes"], task_id=i)
               for i, e in enumerate(config_entries(str(root)))]
    splits = {d: read_pairs(d) for d in domains}
    cache = VolumeCache(str(tmp_path_factory.mktemp("cache")))
    train = {d: s[0] for d, s in splits.items()}
    cache.build(train, SIZE, num_workers=2, progress=False)
    return domains, splits, train, cache


def test_cache_keys_rebuild_and_memmap(dataset, tmp_path):
    domains, _, train, cache = dataset
    assert cache.build(train, SIZE, progress=False) == 0  # everything cached already
    d = domains[0]
    p = train[d][0]
    key = cache.image_key(d, p.moving_image, None, SIZE)
    arr = cache.array(key)
    assert isinstance(arr, np.memmap) and arr.shape == SIZE and arr.dtype == np.float32
    assert cache.meta(key)["original_shape"] == list(nib.load(p.moving_image).shape)
    assert not [f for f in os.listdir(cache.cache_dir) if f.startswith(".tmp-")]
    # A touched source file, another size or another normalisation mode: new keys.
    assert cache.image_key(d, p.moving_image, None, (8, 8, 8)) != key
    assert VolumeCache(cache.cache_dir, "reference").image_key(d, p.moving_image, None, SIZE) != key
    st = os.stat(p.moving_image)
    os.utime(p.moving_image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    try:
        assert cache.image_key(d, p.moving_image, None, SIZE) != key
        assert cache.build({d: [p]}, SIZE, num_workers=0, progress=False) == 1
    finally:
        os.utime(p.moving_image, ns=(st.st_atime_ns, st.st_mtime_ns))
    lab_key = cache.label_key(d, p.moving_label, None, SIZE)
    assert cache.array(lab_key).dtype == np.uint8
    assert cache.array(lab_key, original=True).shape == tuple(cache.meta(lab_key)["original_shape"])


def test_npy_headers_are_opened_one_thread_at_a_time(tmp_path, monkeypatch):
    """numpy parses a .npy header with ``ast``, which CPython 3.11 cannot run in two threads at
    once (cpython gh-106905): ``open_npy`` (the loader's and the cache's reads) holds a lock while
    opening, so the opens never overlap, whatever the threads; the arrays are the saved ones."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from promptreg_jax.data import cache as cache_mod
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"v{i}.npy"))
        np.save(paths[-1], np.full((4, 4, 4), i, np.float32))
    inside, most, guard = [0], [0], threading.Lock()
    real_load = np.load

    def slow_load(*args, **kwargs):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        threading.Event().wait(0.02)  # hold the open long enough for the threads to collide
        try:
            return real_load(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(cache_mod.np, "load", slow_load)
    with ThreadPoolExecutor(8) as pool:
        arrays = list(pool.map(cache_mod.open_npy, paths * 4))
    assert most[0] == 1
    assert [float(a[0, 0, 0]) for a in arrays] == [float(i) for i in range(8)] * 4
    with pytest.raises(DataError, match="missing.npy"):
        cache_mod.open_npy(str(tmp_path / "missing.npy"))


def test_cache_rejects_label_on_another_grid(tmp_path):
    img = _save(tmp_path / "i.nii.gz", np.random.default_rng(0).normal(size=(6, 7, 8)))
    lab = np.zeros((6, 7, 9), np.uint8)
    lab[2, 2, 2] = 1
    lab_path = _save(tmp_path / "l.nii.gz", lab)
    d = Domain("x", "mr", "csv", str(tmp_path), 2, task_id=0)
    with pytest.raises(DataError, match="differs from its image") as err:
        VolumeCache(str(tmp_path / "c")).build({d: [Pair(img, lab_path, img, lab_path)]}, SIZE,
                                               progress=False)
    assert str(err.value).startswith(lab_path)


# Loader -----------------------------------------------------------------------------------------
def _stream(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_exact_domain_balance_per_epoch(dataset):
    _, _, train, cache = dataset
    p = 4  # 3 domains with 2, 2 and 3 pairs -> epochs of 12, reshuffled
    batches = _stream(make_train_loader(train, cache, SIZE, 2, seed=3, pairs_per_domain=p,
                                        progress=False), 12)
    tasks = np.concatenate([b["task_id"] for b in batches])
    epochs = tasks.reshape(2, 12)
    for e in epochs:
        assert np.bincount(e, minlength=3).tolist() == [p, p, p]
    assert not np.array_equal(epochs[0], epochs[1])
    b = batches[0]
    assert b["moving"].shape == (2, *SIZE, 1) and b["moving"].dtype == np.float32
    assert b["task_id"].dtype == np.int32 and "moving_label" not in b
    assert 0.0 <= b["moving"].min() and b["moving"].max() <= 1.0


def test_streams_are_seeded_and_resume(dataset):
    _, _, train, cache = dataset
    make = lambda seed: make_train_loader(train, cache, SIZE, 2, seed, 4, progress=False)  # noqa: E731
    ds = make(0)
    first = _stream(ds, 6)
    again = _stream(make(0), 6)
    other = _stream(make(1), 6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["moving"], b["moving"])
    assert any(not np.array_equal(a["moving"], b["moving"]) for a, b in zip(first, other))
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    it2 = iter(make(0))
    it2.set_state(state)
    for expected in first[3:]:
        got = next(it2)
        np.testing.assert_array_equal(got["fixed"], expected["fixed"])
        np.testing.assert_array_equal(got["task_id"], expected["task_id"])


def test_process_slices_make_the_global_batch(dataset):
    _, _, train, cache = dataset
    whole = _stream(make_train_loader(train, cache, SIZE, 4, 7, 4, progress=False), 3)
    parts = [_stream(make_train_loader(train, cache, SIZE, 2, 7, 4, process_index=i, process_count=2,
                                       progress=False), 3) for i in range(2)]
    for step, batch in enumerate(whole):
        for key in ("moving", "fixed", "task_id"):
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_labels_match_their_images(dataset):
    domains, _, train, cache = dataset
    by_image = {}
    for d in domains:
        for p in train[d]:
            for image, label in ((p.moving_image, p.moving_label), (p.fixed_image, p.fixed_label)):
                ik, lk = cache.image_key(d, image, None, SIZE), cache.label_key(d, label, None, SIZE)
                by_image[np.asarray(cache.array(ik)).tobytes()] = np.asarray(cache.array(lk))
    for batch in _stream(make_train_loader(train, cache, SIZE, 3, 0, 2, with_labels=True,
                                           progress=False), 2):
        assert batch["moving_label"].shape == (3, *SIZE) and batch["fixed_label"].dtype == np.int32
        for i in range(3):
            for side in ("moving", "fixed"):
                expected = by_image[np.ascontiguousarray(batch[side][i, ..., 0]).tobytes()]
                np.testing.assert_array_equal(batch[f"{side}_label"][i], expected)


def test_eval_items_keep_original_resolution(dataset):
    domains, splits, _, cache = dataset
    d = domains[2]  # cardiac: anisotropic, stored with flipped axes
    items = list(iterate_eval_pairs(d, splits[d][1], cache, SIZE))
    assert len(items) == len(splits[d][1])
    item = items[0]
    assert item["moving"].shape == (1, *SIZE, 1) and item["fixed_label"].shape == (1, *SIZE)
    shape = tuple(item["fixed_meta"]["original_shape"])
    assert item["fixed_label_orig"].shape == shape == nib.load(item["pair"].fixed_label).shape
    np.testing.assert_allclose(item["fixed_meta"]["spacing"],
                               nib.load(item["pair"].fixed_label).header.get_zooms(), rtol=1e-6)
    assert np.all(np.diag(np.asarray(item["fixed_meta"]["affine"]))[:3] > 0)
    assert item["task_id"].tolist() == [2]
    canon = nib.as_closest_canonical(nib.load(item["pair"].fixed_label))
    np.testing.assert_array_equal(item["fixed_label_orig"], np.asarray(canon.dataobj))


def test_workers_and_orbax_checkpoint(dataset, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    _, _, train, cache = dataset
    make = lambda **kw: make_train_loader(train, cache, SIZE, 2, 5, 4, progress=False, **kw)  # noqa: E731
    expected = _stream(make(), 4)
    worker_it = iter(make(num_workers=1))  # a spawned reader process: the same stream
    with_worker = [next(worker_it), next(worker_it)]
    resumed = iter(make(num_workers=1))
    resumed.set_state(worker_it.get_state())
    with_worker += [next(resumed), next(resumed)]
    it = iter(make())
    got = [next(it), next(it)]
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    it2 = iter(make())
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    got += [next(it2), next(it2)]
    mngr.close()
    for a, b, c in zip(got, expected, with_worker):
        np.testing.assert_array_equal(a["moving"], b["moving"])
        np.testing.assert_array_equal(c["moving"], b["moving"])
        np.testing.assert_array_equal(a["task_id"], b["task_id"])


def test_loader_throughput(dataset):
    _, _, train, cache = dataset
    stats = loader_throughput(train, cache, SIZE, batch_size=2, num_batches=3)
    assert stats["pairs"] == 6 and stats["pairs_per_s"] > 0


def test_cine_frames_through_cache_and_eval(tmp_path):
    frames = np.stack([np.pad(np.ones((3 + t, 4, 2)), ((1, 4 - t), (1, 1), (1, 1))) * (t + 1)
                       for t in range(3)], -1).astype(np.float32)  # (8, 6, 4, 3): 3 "phases"
    img = _save(tmp_path / "X_sa.nii.gz", frames + 0.5)
    gt = _save(tmp_path / "X_sa_gt.nii.gz", (frames > 0).astype(np.uint8))
    d = Domain("cine", "mr", "mnms", str(tmp_path), 2, task_id=0)
    pair = Pair(img, gt, img, gt, moving_frame=2, fixed_frame=0)
    (item,) = iterate_eval_pairs(d, [pair], VolumeCache(str(tmp_path / "c")), (8, 8, 8))
    assert item["moving_label_orig"].sum() == 5 * 4 * 2 and item["fixed_label_orig"].sum() == 3 * 4 * 2
    assert item["moving_meta"]["frame"] == 2 and item["moving_meta"]["file_shape"] == [8, 6, 4, 3]
    assert not np.array_equal(item["moving"], item["fixed"])

"""Metrics on hand-made label maps and fields with known answers."""

import numpy as np
import pytest

from promptreg_jax import metrics as M


def _cube(shape, lo, size, value=1):
    lab = np.zeros(shape, np.int32)
    lab[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = value
    return lab


def test_dice_of_offset_cubes():
    a = _cube((20, 20, 20), (4, 4, 4), 8)
    b = _cube((20, 20, 20), (6, 4, 4), 8)  # offset by 2 voxels: overlap 6*8*8 of 8^3 each
    np.testing.assert_allclose(M.dice(a, b), [2 * 6 * 64 / (2 * 512)])
    np.testing.assert_allclose(M.dice(a, a), [1.0])


def test_dice_absent_labels():
    a = _cube((10, 10, 10), (1, 1, 1), 3, value=1)
    b = _cube((10, 10, 10), (5, 5, 5), 3, value=2)
    d = M.dice(a, b, labels=[1, 2, 3])
    np.testing.assert_allclose(d[:2], [0.0, 0.0])
    assert np.isnan(d[2])  # absent from both


def test_hd95_in_mm_for_offset_cubes():
    a = _cube((24, 24, 24), (6, 6, 6), 8)
    b = _cube((24, 24, 24), (9, 6, 6), 8)  # 3 voxels along axis 0
    assert M.hd95(a, b)[0] == pytest.approx(3.0)
    assert M.hd95(a, b, spacing=(2.0, 1.0, 1.0))[0] == pytest.approx(6.0)
    assert M.hd95(a, a)[0] == 0.0
    assert np.isinf(M.hd95(a, np.zeros_like(a), labels=[1])[0])


def test_jacobian_of_affine_fields_and_a_fold():
    x = np.stack(np.meshgrid(*[np.arange(10.0)] * 3, indexing="ij"), -1)
    # u = 0.5 x  ->  J = 1.5^3 everywhere.
    np.testing.assert_allclose(M.jacobian_determinant(0.5 * x), 1.5 ** 3, rtol=1e-10)
    assert M.fraction_nonpositive_jacobian(np.zeros((6, 6, 6, 3))) == 0.0
    # A fold: u_0 = -2 x_0 on a slab reverses axis 0 there (J = 1 - 2 = -1).
    flow = np.zeros((10, 10, 10, 3))
    flow[:, :, :5, 0] = -2.0 * x[:, :, :5, 0]
    frac = M.fraction_nonpositive_jacobian(flow)
    assert frac == pytest.approx(0.5, abs=0.11)
    det = M.jacobian_determinant(flow)
    assert np.all(det[:, :, :4] < 0) and np.all(det[:, :, 6:] > 0)


def test_sdlogj_clean_and_learn2reg_variants():
    zero = np.zeros((12, 12, 12, 3))
    assert M.sdlogj(zero) == 0.0
    assert M.sdlogj(zero, learn2reg_compatible=True) == 0.0
    rng = np.random.default_rng(0)
    flow = rng.normal(0, 0.2, (16, 16, 16, 3))
    clean = M.sdlogj(flow)
    l2r = M.sdlogj(flow, learn2reg_compatible=True)
    assert clean > 0 and l2r > 0
    assert l2r < clean  # the +3 offset of the official script compresses the value
    # Learn2Reg form by hand on the cropped interior.
    g = [np.gradient(flow[..., c], axis=a) for c in range(3) for a in range(3)]
    det = np.linalg.det(np.stack(g, -1).reshape(16, 16, 16, 3, 3) + np.eye(3))[2:-2, 2:-2, 2:-2]
    np.testing.assert_allclose(l2r, np.log(np.clip(det + 3, 1e-9, 1e9)).std(), rtol=1e-10)


def test_dsc30():
    assert M.dsc30([0.1, 0.2, 0.3, 0.4, 0.5, np.nan]) == pytest.approx(np.percentile([.1, .2, .3, .4, .5], 30))


def test_sdlogj_of_determinant_over_a_mask():
    det = np.ones((8, 8, 8))
    det[0, 0, 0] = 100.0  # at the border: cropped by default, counted where the mask holds it
    det[4, 4, 4] = np.e
    mask = np.zeros(det.shape, bool)
    mask[3:6, 3:6, 3:6] = True
    assert M.sdlogj_of_determinant(det) == np.log(np.r_[np.e, np.ones(63)]).std()
    np.testing.assert_allclose(M.sdlogj_of_determinant(det, mask=mask),
                               np.r_[1.0, np.zeros(26)].std(), rtol=1e-12)
    mask[0, 0, 0] = True
    assert M.sdlogj_of_determinant(det, mask=mask) > M.sdlogj_of_determinant(det)
    assert np.isnan(M.sdlogj_of_determinant(det, mask=np.zeros(det.shape, bool)))

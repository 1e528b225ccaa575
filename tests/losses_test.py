"""MIND-SSC, smoothness and prompt losses: fixtures, a loop reference and properties."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import channels_last, load_fixture
from promptreg_jax import losses as L
from promptreg_jax.spatial import warp


def _slow_mind(img, r=2, d=2):
    """Loops over voxels and the 12 listed pairs (SPEC Appendix A.5), float64, batch of one."""
    X, Y, Z = img.shape
    at = lambda p: img[tuple(np.clip(p, 0, np.array(img.shape) - 1))]  # edge padding
    delta = np.zeros((12, X, Y, Z))
    for k, (a, b) in enumerate(L.MIND_EDGES):
        for p in itertools.product(range(X), range(Y), range(Z)):
            p = np.array(p)
            delta[k][tuple(p)] = (at(p + d * np.array(a)) - at(p + d * np.array(b))) ** 2
    ssd = np.zeros_like(delta)
    for k in range(12):
        for p in itertools.product(range(X), range(Y), range(Z)):
            acc = 0.0
            for o in itertools.product(range(-r, r + 1), repeat=3):
                q = np.clip(np.array(p) + o, 0, np.array(img.shape) - 1)
                acc += delta[k][tuple(q)]
            ssd[k][p] = acc / (2 * r + 1) ** 3
    mind = ssd - ssd.min(0)
    var = mind.mean(0)
    vbar = var.mean()
    var = np.clip(var, 1e-3 * vbar, 1e3 * vbar)
    return np.moveaxis(np.exp(-mind / var), 0, -1)


@pytest.fixture(scope="module")
def ops():
    return load_fixture("reference_ops.npz")


def test_mind_matches_reference(ops):
    img = channels_last(ops["image"])
    np.testing.assert_allclose(L.mind_ssc(img), channels_last(ops["mindssc_image_r2_d2"]), atol=1e-5)
    loss = L.mind_loss(img, channels_last(ops["image2"]))
    np.testing.assert_allclose(loss, ops["mind_loss_image_image2"], rtol=1e-5)


def test_smoothness_matches_reference(ops):
    np.testing.assert_allclose(L.smoothness_loss(channels_last(ops["flow"])), ops["grad_l2_flow"],
                               rtol=1e-5)


def test_mind_equals_slow_loop_reference():
    img = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    fast = np.asarray(L.mind_ssc(img[None, ..., None])[0])
    np.testing.assert_allclose(fast, _slow_mind(img.astype(np.float64)), atol=2e-5)


def test_mind_properties():
    rng = np.random.default_rng(1)
    img = rng.random((1, 12, 10, 9, 1)).astype(np.float32)
    m = np.asarray(L.mind_ssc(img))
    assert m.shape == (1, 12, 10, 9, 12)
    assert np.all(m > 0) and np.all(m <= 1.0 + 1e-6)
    np.testing.assert_allclose(m.max(-1), 1.0, atol=1e-6)  # per-voxel max is exactly 1
    np.testing.assert_allclose(L.mind_ssc(3.0 * img + 7.0), m, atol=1e-4)  # a*I + b invariant
    assert float(L.mind_loss(img, img)) == 0.0
    # Per-sample variance mean: a sample's descriptor ignores the rest of the batch.
    pair = np.concatenate([img, 5.0 * rng.random(img.shape).astype(np.float32)])
    np.testing.assert_allclose(L.mind_ssc(pair)[:1], m, atol=1e-6)
    # A constant image gives a finite descriptor (the reference gives NaN).
    assert np.all(np.isfinite(L.mind_ssc(np.ones_like(img))))


def test_mind_loss_gradient_through_warp_and_jit():
    rng = np.random.default_rng(2)
    mov = rng.random((2, 10, 10, 10, 1)).astype(np.float32)
    fix = rng.random((2, 10, 10, 10, 1)).astype(np.float32)
    flow = rng.normal(0, 0.5, (2, 10, 10, 10, 3)).astype(np.float32)
    f = lambda fl: L.mind_loss(warp(mov, fl), fix)
    g = jax.grad(f)(flow)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    jitted = float(L.mind_loss(mov, fix))
    with jax.disable_jit():
        eager = float(L.mind_loss(mov, fix))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    # A batch of two equals the mean of two singles (per-sample statistics).
    singles = [float(L.mind_loss(mov[i:i + 1], fix[i:i + 1])) for i in range(2)]
    np.testing.assert_allclose(jitted, np.mean(singles), rtol=1e-5)


def test_smoothness_on_linear_ramp():
    # u_0 = 0.5 * x along axis 0: forward differences are 0.5 on that axis, 0 elsewhere.
    flow = np.zeros((1, 6, 5, 4, 3), np.float32)
    flow[..., 0] = 0.5 * np.arange(6)[:, None, None]
    np.testing.assert_allclose(L.smoothness_loss(flow), (0.25 / 3) / 3, rtol=1e-6)
    assert float(L.smoothness_loss(np.ones((1, 4, 4, 4, 3), np.float32))) == 0.0


def test_orthogonality_loss_on_hand_built_prompts():
    eye = np.eye(3, 8, dtype=np.float32).reshape(3, 2, 2, 2, 1)
    assert float(L.orthogonality_loss(4.0 * eye)) == pytest.approx(0.0, abs=1e-6)
    same = np.ones((2, 2, 2, 2, 1), np.float32)
    # Gram of two identical unit rows is all ones: ||G - I||_F = sqrt(2).
    assert float(L.orthogonality_loss(same)) == pytest.approx(np.sqrt(2), rel=1e-6)
    # A single prompt (Z = 1) is trivially orthogonal: loss ~0 with a finite, ~0 gradient.
    g = jax.grad(L.orthogonality_loss)(np.ones((1, 2, 2, 2, 3), np.float32))
    assert np.all(np.isfinite(g)) and np.abs(g).max() < 1e-6


def test_task_similarity_loss_known_and_unknown():
    skb = np.eye(3, 8, dtype=np.float32).reshape(3, 8)
    prompts = np.stack([skb[1], skb[0] + skb[2]])  # cos with its target: 1, and 1/sqrt(2)
    loss = L.task_similarity_loss(prompts, skb, np.array([1, 2]))
    np.testing.assert_allclose(loss, 0.5 * (0.0 + (1 - 1 / np.sqrt(2)) ** 2), rtol=1e-5)
    # Unknown domains (-1) are excluded from the mean; all unknown gives 0.
    np.testing.assert_allclose(L.task_similarity_loss(prompts, skb, np.array([-1, 2])),
                               (1 - 1 / np.sqrt(2)) ** 2, rtol=1e-5)
    assert float(L.task_similarity_loss(prompts, skb, np.array([-1, -1]))) == 0.0


def test_mind_channels_first_form_gives_the_same_numbers(monkeypatch):
    """The TPU's channels-first descriptors (``_mind_ssc(channels_first=True)``) and loss equal
    the channels-last ones, values and gradients; under ``target_platform("tpu")`` the loss
    traces the channels-first form."""
    from promptreg_jax.conv import target_platform
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.random((2, 9, 10, 14, 1)), jnp.float32)
    b = jnp.asarray(rng.random((2, 9, 10, 14, 1)), jnp.float32)
    np.testing.assert_allclose(jnp.moveaxis(L._mind_ssc(a, channels_first=True), 1, -1),
                               L.mind_ssc(a), atol=1e-6)
    la, ga = jax.value_and_grad(L._mind_loss)(a, b, False)
    lb, gb = jax.value_and_grad(L._mind_loss)(a, b, True)
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    np.testing.assert_allclose(gb, ga, atol=1e-6 * float(jnp.abs(ga).max()) + 1e-12)
    calls = []
    monkeypatch.setattr(L, "_mind_loss", lambda w, f, channels_first: calls.append(channels_first))
    for platform in ("tpu", "cpu"):
        with target_platform(platform):
            L.mind_loss(a, b)
    assert calls == [True, False]

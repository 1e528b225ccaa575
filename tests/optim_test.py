"""Learning-rate schedules and the PyTorch-exact AMSGrad direction."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from promptreg_jax import optim


def test_per_step_schedule_is_polynomial():
    s = optim.make_schedule(1e-4, 1000, 0.9, per="step")
    for t in (0, 1, 10, 250, 999, 1000):
        assert float(s(t)) == pytest.approx(1e-4 * (1 - t / 1000) ** 0.9, rel=2e-4, abs=1e-12)  # float32


def test_per_epoch_schedule_matches_reference_formula():
    # train.py: lr_e = round(1e-4 * (1 - e / 300) ** 0.9, 8), held within each epoch.
    s = optim.make_schedule(1e-4, 300 * 400, 0.9, steps_per_epoch=400, per="epoch")
    for e in (0, 1, 150, 299):
        for t in (e * 400, e * 400 + 399):
            assert float(s(t)) == pytest.approx(round(1e-4 * (1 - e / 300) ** 0.9, 8), rel=1e-5)
    assert float(s(299 * 400)) == pytest.approx(5.9e-7, rel=0.05)
    with pytest.raises(ValueError, match="schedule_per"):
        optim.make_schedule(1e-4, 10, per="iteration")


def _torch_amsgrad(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam(amsgrad=True) as its docs write it, in numpy float64."""
    p, m, v, vmax, out = 0.0, 0.0, 0.0, 0.0, []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        denom = np.sqrt(vmax) / np.sqrt(1 - b2 ** t) + eps
        p = p - lr * (m / (1 - b1 ** t)) / denom
        out.append(p)
    return np.asarray(out)


def test_amsgrad_matches_torch_formula():
    grads = np.asarray([1.0, -3.0, 0.5, 0.1, 2.0, -0.2], np.float64)
    tx = optim.make_optimizer(lambda _: 1e-2)
    params = jnp.zeros(())
    state = tx.init(params)
    got = []
    for g in grads:
        upd, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, upd)
        got.append(float(params))
    np.testing.assert_allclose(got, _torch_amsgrad(grads, 1e-2), rtol=1e-5, atol=1e-7)

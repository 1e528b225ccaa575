"""Optimiser and learning-rate schedule: Adam with PyTorch's AMSGrad, polynomial decay."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def make_schedule(lr: float, total_steps: int, power: float = 0.9, steps_per_epoch: int = 1,
                  per: str = "step") -> optax.Schedule:
    """Polynomial decay ``lr * (1 - t / T) ** power`` to 0.

    ``per="step"`` (the paper) decays every optimiser step over ``total_steps``. ``per="epoch"``
    (the authors' code) holds the value within each epoch: ``t`` is the epoch index, ``T`` the
    number of epochs, and the value is rounded to 8 decimals as ``train.py`` does.
    """
    if per == "step":
        return optax.polynomial_schedule(lr, 0.0, power, max(int(total_steps), 1))
    if per != "epoch":
        raise ValueError(f"optim.schedule_per must be 'step' or 'epoch', got {per!r}")
    epochs = max(int(total_steps) // max(int(steps_per_epoch), 1), 1)

    def schedule(step):
        epoch = jnp.minimum(step // steps_per_epoch, epochs)
        value = lr * (1.0 - epoch / epochs) ** power
        return jnp.round(value * 1e8) / 1e8

    return schedule


class TorchAmsgradState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def scale_by_torch_amsgrad(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """``torch.optim.Adam(amsgrad=True)``'s direction, exactly.

    PyTorch keeps the running maximum of the *raw* second moment and bias-corrects it afterwards:
    ``m_hat / (sqrt(max(v)) / sqrt(1 - b2^t) + eps)``. ``optax.scale_by_amsgrad`` takes the maximum
    of the bias-corrected moment instead, which differs in early steps.
    """

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return TorchAmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        t = count.astype(jnp.float32)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        out = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps), mu, nu_max)
        return out, TorchAmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)


def make_optimizer(schedule: optax.Schedule, amsgrad: bool = True, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam (AMSGrad variant by default, as the reference) with the given schedule."""
    direction = scale_by_torch_amsgrad(b1, b2, eps) if amsgrad else optax.scale_by_adam(b1, b2, eps)
    return optax.chain(direction, optax.scale_by_learning_rate(schedule))

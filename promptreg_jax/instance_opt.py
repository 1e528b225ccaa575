"""Instance optimisation (IO): a few Adam steps on the network's parameters for one pair.

    new_params = instance_optimize(model, params, moving, fixed, steps=10)

The loss is the training similarity and regulariser, MIND-SSC(warped, fixed) + ``smooth`` x the
squared forward differences of the field, plus ``dice`` x (1 - soft Dice) of the warped one-hot
moving label against the fixed one when both network-size labels are given. The prompt
regularisers (L_ort, L_ts) are training-only and not used.

Pure: parameters in, new parameters out. The caller's parameters are never changed (the update
works on a copy and nothing is donated), so registering many pairs in one process always starts
from the same trained network; unlike peers whose IO updates the live model. The update step is
jitted once per model and input shape (and label class count); the learning rate and the loss
weights are traced values, so changing them does not recompile.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from promptreg_jax import losses
from promptreg_jax.spatial import warp

DEFAULT_WEIGHTS = {"mind": 1.0, "smooth": 0.1, "dice": 1.0}
# Adam's learning rate, by measurement (``experiments/quality_table.py --sweep-weight-io``, the
# README's "Evaluation and registration"): on held-out synthetic pairs, images only, the demo
# network's Dice rose most at 1e-4 over 20 steps (+0.25, 5 pairs); 1e-5 (the earlier default)
# +0.10; 1e-3 no further than 1e-4, with more folding and SDlogJ on the way.
DEFAULT_LR = 1e-4


def one_hot(label, num_classes: int) -> np.ndarray:
    """``(1, X, Y, Z)`` or ``(X, Y, Z)`` integer labels -> ``(1, X, Y, Z, num_classes)`` float32."""
    label = np.asarray(label)
    if label.ndim == 3:
        label = label[None]
    if label.ndim != 4:
        raise ValueError(f"label must be (X,Y,Z) or (1,X,Y,Z), got shape {label.shape}")
    return np.eye(num_classes, dtype=np.float32)[label.astype(np.int64)]


soft_dice_loss = losses.soft_dice_loss  # kept here for one release; use promptreg_jax.losses


def io_loss(model, params, moving, fixed, weights, moving_onehot=None, fixed_onehot=None):
    """The IO objective of one pair (traceable); ``weights`` has keys mind, smooth, dice.

    The training objective (``losses.registration_objective``) without the prompt terms, plus the
    soft Dice of the warped labels when both are given.
    """
    out = model.apply({"params": params}, moving, fixed, None)
    total, _ = losses.registration_objective(
        out, fixed, {"mind": weights["mind"], "smooth": weights["smooth"], "ort": 0.0, "ts": 0.0})
    if moving_onehot is not None and fixed_onehot is not None:
        warped_onehot = warp(moving_onehot, out["flow"], order=1)
        total = total + weights["dice"] * losses.soft_dice_loss(warped_onehot, fixed_onehot)
    return total


_TX = optax.inject_hyperparams(optax.adam)(learning_rate=DEFAULT_LR)


@functools.partial(jax.jit, static_argnums=0)
def _step(model, params, opt_state, moving, fixed, weights, moving_onehot, fixed_onehot):
    """One Adam step of IO; jitted once per (model settings, shapes). Flax modules hash by their
    fields, so equal models share the compiled step and nothing is kept per model object."""
    loss, grads = jax.value_and_grad(
        lambda p: io_loss(model, p, moving, fixed, weights, moving_onehot, fixed_onehot))(params)
    updates, opt_state = _TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _init(params, lr: float):
    state = _TX.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return state


def _check(moving, fixed, moving_label, fixed_label, steps, lr):
    if steps < 0:
        raise ValueError(f"instance optimisation steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"instance optimisation learning rate must be > 0, got {lr}")
    if np.shape(moving) != np.shape(fixed) or len(np.shape(moving)) != 5:
        raise ValueError(f"moving {np.shape(moving)} and fixed {np.shape(fixed)} must both be "
                         f"(1,X,Y,Z,1) at the network size")
    for name, lab in (("moving_label", moving_label), ("fixed_label", fixed_label)):
        if lab is not None and np.shape(lab)[-3:] != np.shape(moving)[1:4]:
            raise ValueError(f"{name} shape {np.shape(lab)} is not the network size "
                             f"{np.shape(moving)[1:4]}")


def instance_optimize(model, params, moving, fixed, steps: int, lr: float = DEFAULT_LR,
                      weights: Mapping[str, float] | None = None, moving_label=None,
                      fixed_label=None, num_classes: int | None = None,
                      return_losses: bool = False, on_step=None):
    """``steps`` Adam steps on ``params`` for the pair ``(moving, fixed)``; returns new params.

    ``moving``/``fixed``: ``(1, X, Y, Z, 1)`` preprocessed images at the network size. ``weights``:
    ``mind``, ``smooth``, ``dice`` (missing keys from ``DEFAULT_WEIGHTS``). With both
    ``moving_label`` and ``fixed_label`` (integer, network size) a soft Dice term on their one-hot
    encodings (``num_classes``, default max label + 1) is added. ``params`` is left untouched.
    With ``return_losses`` returns ``(new_params, losses)``, ``losses[k]`` the loss after ``k``
    steps (``steps + 1`` values; the last costs one extra forward/backward pass). ``on_step``,
    if given, is called as ``on_step(k, params)`` after step ``k`` (1 to ``steps``) with the
    parameters at that step (to measure a run at several step counts at once).
    """
    _check(moving, fixed, moving_label, fixed_label, steps, lr)
    w = dict(DEFAULT_WEIGHTS)
    w.update({k: float(v) for k, v in (weights or {}).items()})
    unknown = sorted(set(w) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown instance optimisation weight(s) {unknown}; use "
                         f"{sorted(DEFAULT_WEIGHTS)}")
    w = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
    m_oh = f_oh = None
    if moving_label is not None and fixed_label is not None:
        n = int(num_classes or max(int(np.max(moving_label)), int(np.max(fixed_label))) + 1)
        m_oh, f_oh = jnp.asarray(one_hot(moving_label, n)), jnp.asarray(one_hot(fixed_label, n))
    # A private copy: the caller's arrays (numpy ones included) are never aliased or donated.
    current = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    state = _init(current, lr)
    moving, fixed = jnp.asarray(moving, jnp.float32), jnp.asarray(fixed, jnp.float32)
    history = []
    for k in range(int(steps)):
        current, state, loss = _step(model, current, state, moving, fixed, w, m_oh, f_oh)
        history.append(loss)
        if on_step is not None:
            on_step(k + 1, current)
    if not return_losses:
        return current
    _, _, final = _step(model, current, state, moving, fixed, w, m_oh, f_oh)
    return current, [float(v) for v in jax.device_get(history + [final])]

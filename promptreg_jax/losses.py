"""Training losses: MIND-SSC similarity, smoothness, and the two prompt regularisers.

All take channels-last batches and return scalar means. The reference is the authors' PyTorch
code (``MIND_loss`` and ``Grad3d`` in ``train.py``, the prompt losses in ``PromptReg.py``);
SPEC section 3 and Appendix A.5 give the algorithm, and deviations are marked below.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from promptreg_jax.conv import current_platform
from promptreg_jax.remat import checkpoint

# The six 6-neighbourhood positions of a 3x3x3 kernel, in the reference's order.
_SIX = np.array([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]])
# Pairs (i, j), i > j in row-major order, at squared distance 2: the reference's 12 edges.
_PAIRS = [(i, j) for i, j in itertools.product(range(6), range(6))
          if i > j and int(np.sum((_SIX[i] - _SIX[j]) ** 2)) == 2]
# The reference re-indexes the channels "to match the C++ code" (deeds).
_PERM = (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)
MIND_EDGES = tuple((tuple(_SIX[_PAIRS[k][0]] - 1), tuple(_SIX[_PAIRS[k][1]] - 1)) for k in _PERM)
"""The 12 MIND-SSC channels as offset pairs (units of the dilation), in output order."""


def _box_mean(x, radius: int, spatial=(1, 2, 3)):
    """Mean over the (2r+1)^3 cube of the ``spatial`` axes after edge padding:
    ``avg_pool3d(ReplicationPad3d(r)(x))``.

    Separable: three 1D window sums (``reduce_window``) instead of one (2r+1)^3 window.
    """
    k = 2 * radius + 1
    x = jnp.pad(x, [(radius, radius) if a in spatial else (0, 0) for a in range(x.ndim)],
                mode="edge")
    for axis in spatial:
        window = [1] * x.ndim
        window[axis] = k
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1,) * x.ndim, "VALID")
    return x / float(k ** 3)


def mind_ssc(image, radius: int = 2, dilation: int = 2):
    """MIND-SSC descriptor of ``image (B,X,Y,Z,1)`` -> ``(B,X,Y,Z,12)`` in (0, 1].

    Deviations from the reference, both deliberate:
    * the variance clamp bounds use the mean over each *sample* (the reference uses the whole
      batch); identical at batch 1, and it keeps data-parallel shards independent;
    * a constant image (variance 0, NaN in the reference) gets a floor of 1e-12.
    """
    return _mind_ssc(image, radius, dilation, channels_first=False)


def _mind_ssc(image, radius: int = 2, dilation: int = 2, channels_first: bool = False):
    """:func:`mind_ssc`, as ``(B, 12, X, Y, Z)`` with ``channels_first``: the same numbers,
    which the TPU lays out with Z minor instead of padding 12 channels to 128 lanes (10.7x the
    memory: 1.95 GiB per descriptor at 160^3). XLA:CPU runs the channels-last form faster."""
    if image.ndim != 5 or image.shape[-1] != 1:
        raise ValueError(f"mind_ssc: expected (B,X,Y,Z,1), got {image.shape}")
    d = dilation
    x = image[..., 0]
    shape = x.shape[1:]
    xp = jnp.pad(x, [(0, 0)] + [(d, d)] * 3, mode="edge")

    def shifted(offset):
        starts = [d + d * o for o in offset]
        return xp[:, starts[0]:starts[0] + shape[0], starts[1]:starts[1] + shape[1],
                  starts[2]:starts[2] + shape[2]]

    diffs = [(shifted(a) - shifted(b)) ** 2 for a, b in MIND_EDGES]
    c = 1 if channels_first else -1
    ssd = _box_mean(jnp.stack(diffs, axis=c), radius, (2, 3, 4) if channels_first else (1, 2, 3))
    mind = ssd - jnp.min(ssd, axis=c, keepdims=True)
    var = jnp.mean(mind, axis=c, keepdims=True)
    var_mean = jax.lax.stop_gradient(jnp.mean(var, axis=(1, 2, 3, 4), keepdims=True))
    var_mean = jnp.maximum(var_mean, 1e-12)
    var = jnp.clip(var, 0.001 * var_mean, 1000.0 * var_mean)
    return jnp.exp(-mind / var)


def mind_loss(warped, fixed):
    """Mean squared difference of the MIND-SSC (r=2, d=2) descriptors of two image batches.

    Jitted; the descriptors are laid out channels first when tracing for a TPU (see
    ``_mind_ssc``), channels last elsewhere: the same numbers.
    """
    return _mind_loss(warped, fixed, current_platform() == "tpu")


@functools.partial(jax.jit, static_argnums=2)
def _mind_loss(warped, fixed, channels_first: bool):
    # Checkpointed: the backward pass recomputes the descriptors from the images instead of
    # keeping a dozen 12-channel intermediates per image (the largest tensors at full size).
    descriptor = checkpoint(lambda x: _mind_ssc(x, channels_first=channels_first))
    return jnp.mean((descriptor(warped) - descriptor(fixed)) ** 2)


def smoothness_loss(flow):
    """``Grad3d('l2')``: mean squared forward differences of ``flow``, averaged over 3 axes."""
    terms = [jnp.mean(jnp.diff(flow, axis=axis) ** 2) for axis in (1, 2, 3)]
    return sum(terms) / 3.0


def _unit_rows(x, eps: float = 1e-8):
    flat = x.reshape(x.shape[0], -1)
    return flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), eps)


def orthogonality_loss(skb):
    """L_ort = ||B_n B_n^T - I||_F over the static knowledge base ``(Z, ...)`` (not squared)."""
    b = _unit_rows(skb)
    gram = b @ b.T
    sq = jnp.sum((gram - jnp.eye(b.shape[0], dtype=b.dtype)) ** 2)
    # The norm's gradient is undefined at 0 (always the case for Z = 1): give it 0 there
    # instead of NaN, with the usual double `where`.
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def cosine_similarity(a, b, eps: float = 1e-8):
    """Cosine similarity over all non-batch axes, ``F.cosine_similarity`` style, ``(B,)``."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def task_similarity_loss(weighted_prompt, skb, task_id):
    """L_ts = mean over samples with a known domain of ``(1 - cos(weighted_prompt, skb[t]))^2``.

    ``weighted_prompt (B, ...)`` is the conv-processed weighted SKB mixture (the reference uses
    the prompt *after* its conv), ``skb (Z, ...)``, ``task_id (B,)`` int with -1 for an unknown
    domain. Returns 0 when no sample has a known domain.
    """
    task_id = jnp.asarray(task_id, jnp.int32).reshape(-1)
    known = task_id >= 0
    target = skb[jnp.clip(task_id, 0, skb.shape[0] - 1)]
    per_sample = (1.0 - cosine_similarity(weighted_prompt, target)) ** 2
    count = jnp.sum(known)
    return jnp.sum(jnp.where(known, per_sample, 0.0)) / jnp.maximum(count, 1)


def soft_dice_loss(warped_onehot, fixed_onehot, eps: float = 1e-5):
    """1 - mean soft Dice over the foreground classes present in either one-hot map."""
    axes = tuple(range(warped_onehot.ndim - 1))
    inter = jnp.sum(warped_onehot * fixed_onehot, axis=axes)[1:]
    size = (jnp.sum(warped_onehot, axis=axes) + jnp.sum(fixed_onehot, axis=axes))[1:]
    present = (size > eps).astype(jnp.float32)
    dice = (2.0 * inter + eps) / (size + eps)
    return 1.0 - jnp.sum(dice * present) / jnp.maximum(jnp.sum(present), 1.0)


OBJECTIVE_TERMS = ("mind", "smooth", "ort", "ts")


def registration_objective(out, fixed, weights):
    """The training objective (SPEC section 3) of a model output: ``(total, terms)``.

    ``out`` is what ``PromptReg.apply`` returns (``warped``, ``flow``, ``loss_ort``, ``loss_ts``,
    ``prompt_weights``); ``weights`` maps each of ``OBJECTIVE_TERMS`` to its weight:
    ``total = mind MIND(warped, fixed) + smooth |grad u|^2 + ort L_ort + ts L_ts``. ``terms``
    holds every term, ``loss`` (= total) and ``prompt_entropy`` (mean entropy of the prompt
    weights, a diagnostic). Pure and traceable.
    """
    terms = {
        "mind": mind_loss(out["warped"], fixed),
        "smooth": smoothness_loss(out["flow"]),
        "ort": jnp.asarray(out["loss_ort"], jnp.float32),
        "ts": jnp.asarray(out["loss_ts"], jnp.float32),
    }
    total = sum(weights[k] * terms[k] for k in OBJECTIVE_TERMS)
    w = out["prompt_weights"]
    entropy = -jnp.sum(w * jnp.log(jnp.maximum(w, 1e-12)), axis=-1).mean() if w.shape[-1] else 0.0
    return total, dict(terms, loss=total, prompt_entropy=jnp.asarray(entropy, jnp.float32))

"""PromptReg: two encoders, the RDP recursive decoder and the registration prompt generator (RPG).

SPEC sections 1 and 2. Submodule names echo the reference's PyTorch names (``encoder_moving``,
``cconv_4``, ``defconv4``, ``upconv3``, ``prompt_generator``, ...) so ``convert.py`` is a table.
Images are ``(B, X, Y, Z, C)``; flows ``(B, X, Y, Z, 3)`` in voxels (see ``promptreg_jax.spatial``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from promptreg_jax.conv import CONV_IMPLS, current_platform
from promptreg_jax.fold import fold as fold_z, unfold as unfold_z
from promptreg_jax.layers import (Conv3D, ConvInsBlock, ConvInsBlocks, ResBlock,
                                  UpConvBlock, torch_uniform)
from promptreg_jax.remat import checkpoint_module_fn
from promptreg_jax.sharding import constrain_spatial
from promptreg_jax.losses import cosine_similarity, orthogonality_loss, task_similarity_loss
from promptreg_jax.spatial import compose, integrate, upsample_flow, warp

PROMPT_HEADS = ("spatial", "pooled_attention")


def kaiming_normal_leaky(fan_in: int, a: float = 1e-2):
    """``kaiming_normal_(a, mode='fan_in', nonlinearity='leaky_relu')``, PyTorch-layout fan_in."""
    std = math.sqrt(2.0 / (1.0 + a * a)) / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: std * jax.random.normal(key, shape, dtype)


class Encoder(nn.Module):
    """conv0 (ConvInsBlock 1->c), then three times: stride-2 conv (padding 1) + ResBlock.

    Returns the features at full, 1/2, 1/4 and 1/8 resolution with c, 2c, 4c, 8c channels.
    ``folds`` (one Z-fold per level, 0 = unfolded): the features of a level with a fold are
    computed and returned Z-folded (``promptreg_jax.fold``); the stride-2 convs see unfolded maps.
    """
    channels: int = 16
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    folds: tuple[int, ...] = (0, 0, 0, 0)

    @nn.compact
    def __call__(self, x):
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        fo = lambda h, k: constrain_spatial(fold_z(h, k)) if k else h
        un = lambda h, k: constrain_spatial(unfold_z(h, k)) if k else h
        k = self.folds[0]
        h = constrain_spatial(ConvInsBlock(self.channels, name="conv0", fold=k, **kw)(fo(x, k)))
        feats = [h]
        for i in (1, 2, 3):
            h = Conv3D(self.channels * 2 ** i, strides=2, padding=1, name=f"conv{i}_0",
                       **kw)(un(h, k))
            k = self.folds[i]
            h = constrain_spatial(ResBlock(name=f"conv{i}_1", fold=k, **kw)(fo(h, k)))
            feats.append(h)
        return feats


class PooledAttention(nn.Module):
    """The reference's ``CrossAttention`` with a single key/value token, as the RPG uses it.

    With one key the attention softmax is identically 1, so the output is ``proj(v(token))`` for
    every query voxel and ``q``, ``k`` (zero gradient, no effect) are not created (SPEC 2.4).
    """
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, token):
        dim = token.shape[-1]
        dense = lambda name: nn.Dense(dim, dtype=self.dtype, kernel_init=torch_uniform(dim),
                                      bias_init=torch_uniform(dim), name=name)
        return dense("proj")(dense("v")(token))


class PromptGenerator(nn.Module):
    """RPG (SPEC 2) on the bottleneck feature ``C4 (B, x, y, z, C)``.

    Returns ``(prompt (B,x,y,z,C), weights (B,Z), loss_ort, loss_ts, intermediates)``. The SKB
    ``static_prompt (Z,x,y,z,C)`` and ``prompt_template (1,x,y,z,C)`` take their shape from C4.
    ``task_id (B,)``: int, -1 for an unknown domain; ``None``: all unknown (then L_ts = 0).
    """
    num_tasks: int
    temperature: float = 0.1
    prompt_head: str = "spatial"
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, task_id=None):
        B, C = x.shape[0], x.shape[-1]
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        init = kaiming_normal_leaky(C * math.prod(x.shape[1:4]))
        skb = self.param("static_prompt", init, (self.num_tasks, *x.shape[1:]), jnp.float32)
        template = self.param("prompt_template", init, (1, *x.shape[1:]), jnp.float32)
        # The reference only works at batch 1 here; the template is broadcast over the batch.
        template = jnp.broadcast_to(template, x.shape).astype(x.dtype)
        dyn = ConvInsBlocks((C, C), name="dynamic_fusion", **kw)(jnp.concatenate([x, template], -1))
        dyn32 = dyn.astype(jnp.float32)
        sims = jnp.stack([cosine_similarity(dyn32, jnp.broadcast_to(skb[i], dyn.shape))
                          for i in range(self.num_tasks)], axis=1)
        weights = jax.nn.softmax(sims / self.temperature, axis=1)
        mixed = jnp.einsum("bz,z...->b...", weights, skb)
        mixed = ConvInsBlocks((C,), name="conv", **kw)(mixed)  # S': what L_ts compares
        prompt = ConvInsBlocks((C, C), (3, 1), name="fusion", **kw)(
            jnp.concatenate([dyn, mixed.astype(dyn.dtype)], -1))
        if self.prompt_head == "pooled_attention":
            token = jnp.mean(prompt.astype(jnp.float32), axis=(1, 2, 3))
            token = PooledAttention(self.dtype, name="cross_attention")(token)
            prompt = jnp.broadcast_to(token[:, None, None, None, :], x.shape).astype(x.dtype)
        elif self.prompt_head != "spatial":
            raise ValueError(f"prompt_head must be one of {PROMPT_HEADS}, got {self.prompt_head!r}")
        if task_id is None:
            task_id = jnp.full((B,), -1, jnp.int32)
        task_id = jnp.asarray(task_id, jnp.int32)
        if task_id.shape != (B,):
            raise ValueError(f"task_id must have shape ({B},) (one id per sample, -1 = unknown), "
                             f"got {task_id.shape}")
        loss_ort = orthogonality_loss(skb)
        loss_ts = task_similarity_loss(mixed.astype(jnp.float32), skb, task_id)
        return prompt, weights, loss_ort, loss_ts


REMAT_MODES = ("none", "levels", "blocks")


def remat_mode(remat) -> str:
    """``model.remat`` as one of ``REMAT_MODES`` or ``"auto"``: ``False``/``"none"``,
    ``True``/``"levels"`` (each encoder and decoder level keeps only its inputs), ``"blocks"``
    (levels, and inside them each conv block keeps only its input: the least memory, one more
    forward of each block), ``"auto"`` (the trainer compiles the step with the least
    recomputation that fits the device, ``train.choose_remat``; traced by itself, outside the
    trainer, the network recomputes nothing)."""
    if isinstance(remat, (bool, np.bool_)) or remat is None:
        return "levels" if remat else "none"
    remat = {"false": "none", "true": "levels"}.get(str(remat).lower(), str(remat).lower())
    if remat not in REMAT_MODES + ("auto",):
        raise ValueError(f"remat={remat!r}: use 'auto', False, True (= 'levels') or one of "
                         f"{REMAT_MODES}")
    return remat


def traced_remat(remat) -> str:
    """The mode a network traced on its own uses: ``"auto"`` -> ``"none"``."""
    mode = remat_mode(remat)
    return "none" if mode == "auto" else mode


FOLD_MODES = ("auto", 0, 8)


def resolve_fold(fold, platform: str | None = None) -> int:
    """``model.fold`` as the Z-fold of the full-resolution level: ``"auto"`` -> 8 on TPU (whose
    128-lane tiles a 16- or 48-channel map wastes 8x / 2.7x unfolded), 0 elsewhere; an int is
    kept (0 = unfolded). The platform is the one being traced for (``conv.current_platform``)."""
    if isinstance(fold, str) and fold.strip().lower() == "auto":
        return 8 if current_platform(platform) == "tpu" else 0
    try:
        k = int(str(fold).strip()) if isinstance(fold, str) else int(fold)
    except (TypeError, ValueError):
        k = -1
    if k < 0 or k == 1 or (k and 8 % k and k % 8):
        raise ValueError(f"fold={fold!r}: use 'auto', 0 (unfolded) or a Z-fold such as 8")
    return k


FOLD_LEVELS = (1, 2)


def level_folds(fold: int, fold_levels: int | str = 1) -> tuple[int, int, int, int]:
    """The Z-fold of each resolution level (full, 1/2, 1/4, 1/8) for ``model.fold`` (resolved) and
    ``model.fold_levels``: 1 folds the full-resolution level by ``fold``, 2 also the 1/2 level by
    ``fold / 2`` (the channels double as the size halves: 16 x 8 = 32 x 4 = 128 lanes), unfolded
    where that is below 2; ``"auto"`` is the trainer's to resolve (``train.remat_candidates``)
    and 1 in a network traced by itself. (Folding the 1/4 level by 2 as well crashed libtpu
    0.0.42.1's compiler, in its space-to-batch pass on a kernel-gradient conv: not offered.)"""
    n = resolve_fold_levels(fold_levels)
    return tuple(fold >> l if l < n and fold >> l >= 2 else 0 for l in range(4))


def fold_levels_setting(fold_levels):
    """``model.fold_levels`` as saved in a checkpoint's settings: ``"auto"``, 1 or 2."""
    resolve_fold_levels(fold_levels)  # raises on a bad value
    return "auto" if str(fold_levels).strip().lower() == "auto" else int(fold_levels)


def resolve_fold_levels(fold_levels) -> int:
    """``model.fold_levels`` as the number of levels folded (``"auto"`` -> 1)."""
    if str(fold_levels).strip().lower() == "auto":
        return 1
    try:
        n = int(fold_levels)
    except (TypeError, ValueError):
        n = 0
    if n not in FOLD_LEVELS or isinstance(fold_levels, float) and fold_levels != n:
        raise ValueError(f"fold_levels={fold_levels!r}: use 1 (full resolution), 2 (also 1/2) or "
                         f"'auto'")
    return n


def remat_setting(remat):
    """``model.remat`` as saved in a checkpoint's settings: ``False``, ``True``, ``"blocks"`` or
    ``"auto"`` (the trainer saves the mode it chose)."""
    mode = remat_mode(remat)
    return {"none": False, "levels": True}.get(mode, mode)


def fold_setting(fold):
    """``model.fold`` as saved in a checkpoint's settings: ``"auto"`` or an int."""
    resolve_fold(fold)  # raises on a bad value
    return "auto" if str(fold).strip().lower() == "auto" else int(str(fold).strip())


class PromptReg(nn.Module):
    """PromptReg = RDP backbone + RPG at the bottleneck (``use_prompt=False``: plain RDP).

    ``__call__(moving, fixed, task_id=None)``: ``moving``/``fixed`` ``(B,X,Y,Z,1)`` with X, Y, Z
    divisible by 8; ``task_id (B,)`` int, -1 = unknown domain, ``None`` = all unknown (inference).
    Returns a dict:

    * ``flow (B,X,Y,Z,3)`` float32 voxels, ``warped = warp(moving, flow)`` ``(B,X,Y,Z,1)``;
    * ``prompt_weights (B,Z)`` softmax over the SKB entries (``(B,0)`` without the RPG);
    * ``loss_ort`` = L_ort(SKB), ``loss_ts`` = L_ts(S', SKB, task_id): float32 scalars, 0 without
      the RPG (L_ts is also 0 when no task id is known);
    * ``intermediates``: ``encoder_moving_level0`` (full-res moving features, c channels),
      ``c4_after_cconv_4`` (bottleneck, 8c), and with the RPG ``task_prompt`` (its output) and
      ``c4_after_prompt_fusion`` (what the decoder sees).

    Decoder (SPEC 1.4): per level 1/8, 1/4, 1/2, 1, ``schedule[i]`` velocity estimates from one
    shared head, each integrated with ``int_steps`` squarings and composed ``u <- u(x+w)+w``;
    between levels ``u <- upsample(2u)`` (align corners). ``prompt_head``: ``"spatial"`` (the
    paper: the fusion output P) or ``"pooled_attention"`` (the authors' code, SPEC 2.4).
    ``fold`` (``"auto"``: 8 on TPU, else 0) runs the full-resolution encoder block and decoder
    level on Z-folded maps (``promptreg_jax.fold``: lane-dense on TPU, which pads a 16-channel
    map 8x unfolded), same parameters and numbers; ``fold_levels=2`` also folds the 1/2 level's
    encoder blocks and decoder level (by ``fold / 2``; ``"auto"``: the trainer's choice with
    ``remat="auto"``, else 1).
    ``temperature`` 0.1 is the paper's, 0.5 the code's. ``dtype`` is the conv compute dtype; norms,
    flow heads, flows, warps and losses stay float32. ``remat`` keeps only the inputs of each
    encoder and each decoder level for the backward pass and recomputes them there
    (``promptreg_jax.remat``: unlike ``jax.checkpoint`` this also saves memory on XLA:CPU);
    ``remat="blocks"`` also checkpoints each conv block inside the levels. With the fold,
    ``remat="levels"`` fits the paper's 160^3 float32 step on one 16 GiB TPU v5e (README,
    "Will it fit an accelerator?"). The numbers are unchanged.
    """
    channels: int = 16
    num_tasks: int = 5
    use_prompt: bool = True
    prompt_head: str = "spatial"
    temperature: float = 0.1
    schedule: tuple[int, int, int, int] = (2, 2, 3, 1)
    int_steps: int = 7
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    remat: bool | str = False
    fold: int | str = "auto"
    fold_levels: int | str = 1

    def setup(self):
        # setup() rather than @nn.compact: nn.remat of a level needs submodules bound to self.
        if len(self.schedule) != 4 or min(self.schedule) < 1:
            raise ValueError(f"schedule needs 4 counts >= 1 (levels 1/8..1), got {self.schedule}")
        remat_mode(self.remat)  # raises on an unknown mode
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
        if self.prompt_head not in PROMPT_HEADS:
            raise ValueError(f"prompt_head must be one of {PROMPT_HEADS}, got {self.prompt_head!r}")
        c, kw = self.channels, dict(conv_impl=self.conv_impl, dtype=self.dtype)
        bkw = dict(kw, remat=traced_remat(self.remat) == "blocks")  # for ConvInsBlocks
        self._folds = level_folds(resolve_fold(self.fold), self.fold_levels)
        self.encoder_moving = Encoder(c, folds=self._folds, **kw)
        self.encoder_fixed = Encoder(c, folds=self._folds, **kw)
        self.cconv_4 = ConvInsBlocks((8 * c, 8 * c), **bkw)
        if self.use_prompt:
            self.prompt_generator = PromptGenerator(self.num_tasks, self.temperature,
                                                    self.prompt_head, **kw)
            self.prompt_fusion_layer = ConvInsBlocks((8 * c, 8 * c), **bkw)
        self.dconv4 = ConvInsBlocks((8 * c, 8 * c), **bkw)
        # Levels 3, 2, 1 carry f = 4c, 2c, c decoder channels and 3f after concatenation.
        for level, f in ((3, 4 * c), (2, 2 * c), (1, c)):
            fz = self._folds[level - 1]
            lf = dict(fold=fz, groups=(f, f, f)) if fz else {}
            setattr(self, f"upconv{level}", UpConvBlock(f, fold=fz, **kw))
            setattr(self, f"cconv_{level}", ConvInsBlocks((3 * f, 3 * f), **bkw, **lf))
            setattr(self, f"dconv{level}", ConvInsBlock(f, fold=fz, **kw))
        for level in (4, 3, 2, 1):
            # Flow heads: N(0, 1e-5) weights, zero bias, computed in float32.
            setattr(self, f"defconv{level}", Conv3D(
                3, conv_impl=self.conv_impl, kernel_init=nn.initializers.normal(1e-5),
                bias_init=nn.initializers.zeros))

    def _folded(self, level) -> int:
        """The Z-fold of a decoder level's feature maps (0: unfolded); level 1 = full resolution."""
        return self._folds[level - 1]

    def _velocity_to_flow(self, level, feat):
        if self._folded(level):
            # Unfold the features, not the 3-channel velocity: a reshape of the velocity would
            # make the TPU lay out every field, warped image and MIND descriptor channel-minor.
            feat = constrain_spatial(unfold_z(feat, self._folded(level)))
        v = getattr(self, f"defconv{level}")(feat.astype(jnp.float32))
        return constrain_spatial(integrate(constrain_spatial(v), self.int_steps))

    def _decode_level(self, level, fixed_feat, moving_feat, feat, flow):
        """One decoder level: ``schedule`` estimates; returns (features, composed flow)."""
        n = self.schedule[4 - level]
        fz = self._folded(level)
        fo = (lambda x: constrain_spatial(fold_z(x, fz))) if fz else (lambda x: x)
        if fz:  # fixed_feat, moving_feat and the level's features are Z-folded
            moving_feat = constrain_spatial(unfold_z(moving_feat, fz))
        warped = lambda u: fo(constrain_spatial(warp(moving_feat, u).astype(self.dtype)))
        if level == 4:  # feat = C4 after the prompt fusion; flow is None
            step = lambda c, u: constrain_spatial(
                self.dconv4(jnp.concatenate([fixed_feat, warped(u), c], -1)))
            c = feat
        else:
            cconv = getattr(self, f"cconv_{level}")
            dconv = getattr(self, f"dconv{level}")
            step = lambda c, u: constrain_spatial(
                cconv(jnp.concatenate([fixed_feat, warped(u), dconv(c)], -1)))
            if self._folded(level + 1):  # the coarser level's features, folded there
                feat = constrain_spatial(unfold_z(feat, self._folded(level + 1)))
            d = constrain_spatial(getattr(self, f"upconv{level}")(feat))  # folded where fz
            flow = constrain_spatial(upsample_flow(flow))
            c = constrain_spatial(cconv(jnp.concatenate([fixed_feat, warped(flow), d], -1)))
        w = self._velocity_to_flow(level, c)
        for _ in range(n - 1):
            flow = w if flow is None else compose(flow, w)
            c = step(c, flow)
            w = self._velocity_to_flow(level, c)
        return c, (w if flow is None else compose(flow, w))

    def __call__(self, moving, fixed, task_id=None):
        if moving.ndim != 5 or moving.shape != fixed.shape:
            raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} must both be "
                             f"(B,X,Y,Z,C) with the same shape")
        if any(n % 8 for n in moving.shape[1:4]):
            raise ValueError(f"spatial size {moving.shape[1:4]} must be divisible by 8 "
                             f"(three stride-2 levels)")
        B = moving.shape[0]
        remat = traced_remat(self.remat) != "none" and not self.is_initializing()
        encode = lambda mdl, name, x: getattr(mdl, name)(x)
        encode = checkpoint_module_fn(encode, self, static=(0,)) if remat else encode
        M = encode(self, "encoder_moving", moving.astype(self.dtype))
        F = encode(self, "encoder_fixed", fixed.astype(self.dtype))
        c4 = self.cconv_4(jnp.concatenate([F[3], M[3]], -1))
        m0 = unfold_z(M[0], self._folds[0]) if self._folds[0] else M[0]
        inter = {"encoder_moving_level0": m0, "c4_after_cconv_4": c4}
        zero = jnp.zeros((), jnp.float32)
        if self.use_prompt:
            prompt, weights, loss_ort, loss_ts = self.prompt_generator(c4, task_id)
            c4 = self.prompt_fusion_layer(jnp.concatenate([c4, prompt], -1))
            inter.update(task_prompt=prompt, c4_after_prompt_fusion=c4)
        else:
            weights, loss_ort, loss_ts = jnp.zeros((B, 0), jnp.float32), zero, zero
        feat, flow = c4, None
        for level in (4, 3, 2, 1):
            fn = lambda mdl, *args, level=level: PromptReg._decode_level(mdl, level, *args)
            if remat:
                fn = checkpoint_module_fn(fn, self)
            feat, flow = fn(self, F[level - 1], M[level - 1], feat, flow)
        return {"flow": flow, "warped": constrain_spatial(warp(moving, flow)),
                "prompt_weights": weights,
                "loss_ort": loss_ort, "loss_ts": loss_ts, "intermediates": inter}


def count_params(params) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def get_model(name: str, **kwargs) -> nn.Module:
    """``"promptreg"`` -> ``PromptReg(**kwargs)``; ``"voxelmorph"`` -> ``VoxelMorph(**kwargs)``."""
    from promptreg_jax.voxelmorph import VoxelMorph
    models = {"promptreg": PromptReg, "voxelmorph": VoxelMorph}
    if name not in models:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(models)}")
    return models[name](**kwargs)


# ------------------------------------------------------------------------------------ settings
# A model's settings: the constructor arguments plus the name and the training image size; a
# checkpoint stores them in ``meta["model"]`` and every command rebuilds the network from them.
SETTINGS_KEYS = ("name", "channels", "num_tasks", "use_prompt", "prompt_head", "temperature",
                 "schedule", "int_steps", "conv_impl", "dtype", "remat", "fold", "fold_levels",
                 "image_size")


def default_settings() -> dict:
    """The settings of ``PromptReg()`` with its constructor's defaults (image size 160^3)."""
    import dataclasses
    out = {f.name: f.default for f in dataclasses.fields(PromptReg)
           if f.name in SETTINGS_KEYS and f.default is not dataclasses.MISSING}
    out.update(dtype=jnp.dtype(out["dtype"]).name, schedule=[int(s) for s in out["schedule"]])
    return dict(out, name="promptreg", image_size=[160, 160, 160])


def model_settings(config, num_tasks: int) -> dict:
    """The settings of ``config.model`` for ``num_tasks`` training domains (JSON-ready)."""
    m = config.model
    return dict(name=m.name, channels=int(m.channels), num_tasks=int(num_tasks),
                use_prompt=bool(m.use_prompt), prompt_head=m.prompt_head,
                temperature=float(m.temperature), schedule=[int(s) for s in m.schedule],
                int_steps=int(m.int_steps), conv_impl=m.conv_impl, dtype=m.dtype,
                remat=remat_setting(m.remat), fold=fold_setting(m.get("fold", "auto")),
                fold_levels=fold_levels_setting(m.get("fold_levels", 1)),
                image_size=[int(s) for s in config.data.image_size])


def build_model(settings: dict) -> nn.Module:
    """The network of saved settings (a checkpoint's ``meta["model"]``); missing keys take the
    constructor's defaults."""
    kw = {k: v for k, v in settings.items() if k in SETTINGS_KEYS and k not in ("name", "image_size")}
    if "schedule" in kw:
        kw["schedule"] = tuple(kw["schedule"])
    if "dtype" in kw:
        kw["dtype"] = jnp.dtype(kw["dtype"])
    if settings["name"] == "voxelmorph":
        kw = {k: kw[k] for k in ("int_steps", "conv_impl", "dtype", "remat") if k in kw}
        if "remat" in kw:  # VoxelMorph checkpoints every block or none
            kw["remat"] = traced_remat(kw["remat"]) != "none"
    return get_model(settings["name"], **kw)


def load_model(path, allow_fallback: bool = False):
    """``(model, params, meta, step)`` of the newest checkpoint under ``path`` (a run folder, its
    ``checkpoints`` folder or one step folder), parameters as host arrays.

    An unreadable newest checkpoint is an error unless ``allow_fallback``: a registration or
    evaluation must not quietly use another model than the one asked for.
    """
    from promptreg_jax import checkpoint as ckpt_lib
    params, meta, step = ckpt_lib.load_params(path, allow_fallback=allow_fallback)
    if not isinstance(meta.get("model"), dict):
        raise ckpt_lib.CheckpointError(f"checkpoint {path} holds no model settings")
    return build_model(meta["model"]), params, meta, step

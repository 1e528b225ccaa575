"""PromptReg and VoxelMorph on tiny volumes: shapes, init, batching, prompt branch, remat, bf16.

Full-network compilations are the cost on XLA:CPU (tens of seconds each), so each test here
compiles at most two and reuses compiled functions across inputs and parameter values.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promptreg_jax.losses import cosine_similarity, orthogonality_loss
from promptreg_jax.model import (Encoder, PromptGenerator, PromptReg, count_params,
                                 get_model)
from promptreg_jax.voxelmorph import VoxelMorph

# "rbg" keys: threefry's bit generator takes seconds to compile on XLA:CPU.
KEY = jax.random.key(0, impl="rbg")
# Optimisation level 0 roughly halves XLA:CPU compile time; the numbers are the same ops.
FAST = {"xla_backend_optimization_level": 0}
TINY = dict(channels=4, num_tasks=3, schedule=(1, 1, 1, 1))


def _volumes(seed, batch, size=32):
    """Smooth random volumes in [0, 1] (a coarse grid upsampled), ``(B, S, S, S, 1)``."""
    coarse = np.random.default_rng(seed).random((batch, 1, 4, 4, 4))
    vol = np.kron(coarse, np.ones((1, 1, size // 4, size // 4, size // 4)))
    return jnp.asarray(np.moveaxis(vol, 1, -1), jnp.float32)


def _scale_heads(params, factor):
    """Flow-head kernels times ``factor``: std 1e-5 * 400 = 0.004 gives a real deformation."""
    out = dict(params)
    for level in (1, 2, 3, 4):
        head = dict(out[f"defconv{level}"])
        head["kernel"] = head["kernel"] * factor
        out[f"defconv{level}"] = head
    return out


@pytest.fixture(scope="module")
def tiny():
    """A tiny PromptReg (c=4, Z=3, one estimate per level), its params and one compiled apply."""
    model = PromptReg(**TINY)
    moving, fixed = _volumes(0, 2), _volumes(1, 2)
    params = jax.jit(model.init)(KEY, moving, fixed)["params"]
    apply = jax.jit(lambda p, m, f, t: model.apply({"params": p}, m, f, t), compiler_options=FAST)
    return model, params, apply, moving, fixed


@pytest.mark.slow
def test_forward_shapes_and_init(tiny):
    _, params, apply, moving, fixed = tiny
    out = apply(params, moving, fixed, jnp.array([0, -1]))
    assert out["flow"].shape == (2, 32, 32, 32, 3) and out["flow"].dtype == jnp.float32
    assert out["warped"].shape == (2, 32, 32, 32, 1)
    assert out["prompt_weights"].shape == (2, 3)
    np.testing.assert_allclose(np.sum(out["prompt_weights"], axis=1), 1.0, atol=1e-6)
    for leaf in jax.tree_util.tree_leaves(out):
        assert np.all(np.isfinite(leaf))
    assert 0 < np.abs(out["flow"]).max() < 1e-2  # heads N(0, 1e-5): near identity at init
    np.testing.assert_allclose(out["warped"], moving, atol=1e-2)
    inter = out["intermediates"]
    assert inter["encoder_moving_level0"].shape == (2, 32, 32, 32, 4)
    for key in ("c4_after_cconv_4", "task_prompt", "c4_after_prompt_fusion"):
        assert inter[key].shape == (2, 4, 4, 4, 32), key
    # SKB entries are random 2048-vectors: L_ort is small but not 0, L_ts ~ 1 at init.
    assert 0 < out["loss_ort"] < 1 and 0.5 < out["loss_ts"] < 1.5
    np.testing.assert_allclose(out["loss_ort"], orthogonality_loss(params["prompt_generator"]
                                                                   ["static_prompt"]), rtol=1e-5)
    unknown = apply(params, moving, fixed, jnp.array([-1, -1]))
    assert float(unknown["loss_ts"]) == 0.0
    np.testing.assert_array_equal(unknown["flow"], out["flow"])  # task ids only feed L_ts


@pytest.mark.slow
def test_samples_in_a_batch_are_independent(tiny):
    """Batch [a, b] and batch [a, c]: sample a's outputs are identical (one compiled function)."""
    _, params, apply, moving, fixed = tiny
    params = _scale_heads(params, 400.0)
    other = moving.at[1].set(_volumes(2, 1)[0])
    tid = jnp.array([1, -1])
    out_b, out_c = apply(params, moving, fixed, tid), apply(params, other, fixed, tid)
    assert np.abs(out_b["flow"]).max() > 0.2  # a real deformation
    for key in ("flow", "warped", "prompt_weights"):
        np.testing.assert_allclose(out_b[key][0], out_c[key][0], atol=1e-5, rtol=1e-5)
        assert np.abs(out_b[key][1] - out_c[key][1]).max() > 1e-4
    np.testing.assert_allclose(out_b["loss_ts"], out_c["loss_ts"], rtol=1e-5)  # sample 1: -1


@pytest.mark.slow
def test_bf16_compute_is_close_to_float32(tiny):
    model, params, apply, moving, fixed = tiny
    params = _scale_heads(params, 400.0)
    model16 = PromptReg(**TINY, dtype=jnp.bfloat16)
    out16 = jax.jit(lambda p: model16.apply({"params": p}, moving, fixed),
                    compiler_options=FAST)(params)
    out32 = apply(params, moving, fixed, jnp.array([-1, -1]))
    assert out16["flow"].dtype == jnp.float32 and out16["loss_ort"].dtype == jnp.float32
    assert out16["intermediates"]["c4_after_cconv_4"].dtype == jnp.bfloat16
    for leaf in jax.tree_util.tree_leaves(out16):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    scale = np.abs(out32["flow"]).max()
    assert np.abs(out16["flow"] - out32["flow"]).max() < 0.1 * scale
    np.testing.assert_allclose(out16["prompt_weights"], out32["prompt_weights"], atol=0.02)
    np.testing.assert_allclose(out16["loss_ort"], out32["loss_ort"], rtol=1e-6)


@pytest.mark.parametrize("head", ["spatial", "pooled_attention"])
def test_prompt_generator(head):
    c4 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 2, 8)), jnp.float32)
    gen = PromptGenerator(num_tasks=3, temperature=0.5, prompt_head=head)
    params = jax.jit(gen.init)(KEY, c4)["params"]
    assert params["static_prompt"].shape == (3, 4, 4, 2, 8)
    assert params["prompt_template"].shape == (1, 4, 4, 2, 8)
    assert ("cross_attention" in params) == (head == "pooled_attention")
    std = math.sqrt(2 / (1 + 1e-4)) / math.sqrt(8 * 4 * 4 * 2)
    np.testing.assert_allclose(np.std(params["static_prompt"]), std, rtol=0.15)
    apply = jax.jit(lambda t: gen.apply({"params": params}, c4, t, capture_intermediates=True))
    (prompt, weights, loss_ort, loss_ts), state = apply(jnp.array([1, -1]))
    assert prompt.shape == c4.shape and weights.shape == (2, 3)
    np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, atol=1e-6)
    if head == "pooled_attention":  # one token broadcast: constant over space
        np.testing.assert_allclose(np.std(prompt, axis=(1, 2, 3)), 0.0, atol=1e-6)
    else:
        assert np.std(prompt, axis=(1, 2, 3)).min() > 1e-3
    # L_ts averages over the samples with a known domain: sample 0, target SKB entry 1.
    mixed = state["intermediates"]["conv"]["__call__"][0]
    expected = (1 - cosine_similarity(mixed[:1], params["static_prompt"][1:2])[0]) ** 2
    np.testing.assert_allclose(loss_ts, expected, rtol=1e-5)
    np.testing.assert_allclose(loss_ort, orthogonality_loss(params["static_prompt"]), rtol=1e-6)
    assert float(apply(jnp.array([-1, -1]))[0][3]) == 0.0
    assert float(gen.apply({"params": params}, c4, None)[3]) == 0.0
    with pytest.raises(ValueError, match="task_id"):
        gen.apply({"params": params}, c4, jnp.array([1]))


def test_encoder_shapes_and_separate_weights():
    """(jit equals eager is checked on the blocks in layers_test.)"""
    x = jax.ShapeDtypeStruct((1, 16, 16, 16, 1), jnp.float32)
    feats = jax.eval_shape(lambda x: Encoder(channels=2).init_with_output(KEY, x)[0], x)
    assert [f.shape for f in feats] == [(1, 16, 16, 16, 2), (1, 8, 8, 8, 4), (1, 4, 4, 4, 8),
                                        (1, 2, 2, 2, 16)]
    params = jax.eval_shape(PromptReg(**TINY).init, KEY, x, x)["params"]
    assert set(params["encoder_moving"]) == set(params["encoder_fixed"]) == {
        "conv0", "conv1_0", "conv1_1", "conv2_0", "conv2_1", "conv3_0", "conv3_1"}


@pytest.mark.slow
def test_remat_gives_same_outputs_and_gradients():
    """Plain RDP (use_prompt=False) with and without nn.remat per decoder level."""
    moving, fixed = _volumes(0, 1, size=16), _volumes(1, 1, size=16)
    cfg = dict(channels=2, use_prompt=False, schedule=(1, 1, 1, 1), int_steps=0)
    params = jax.jit(PromptReg(**cfg).init)(KEY, moving, fixed)["params"]
    params = _scale_heads(params, 400.0)
    assert not {"prompt_generator", "prompt_fusion_layer"} & set(params)

    def run(remat):
        model = PromptReg(**cfg, remat=remat)

        def loss(p):
            out = model.apply({"params": p}, moving, fixed)
            return jnp.mean((out["warped"] - fixed) ** 2) + jnp.mean(out["flow"] ** 2), out
        return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST)(params)

    (loss0, out0), grad0 = run(False)
    assert out0["prompt_weights"].shape == (1, 0)
    assert float(out0["loss_ort"]) == 0.0 and float(out0["loss_ts"]) == 0.0
    assert set(out0["intermediates"]) == {"encoder_moving_level0", "c4_after_cconv_4"}
    assert max(np.abs(g).max() for g in jax.tree_util.tree_leaves(grad0["defconv1"])) > 0
    # "blocks" also checkpoints each conv block inside the levels (nn.remat): same parameter
    # tree (it initialises the same variables) and the same numbers.
    blocks = PromptReg(**cfg, remat="blocks")
    assert jax.tree_util.tree_structure(jax.eval_shape(blocks.init, KEY, moving, fixed)) == \
        jax.tree_util.tree_structure({"params": params})
    for remat in (True, "blocks"):
        (loss1, out1), grad1 = run(remat)
        np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
        np.testing.assert_allclose(out1["flow"], out0["flow"], atol=1e-6)
        assert jax.tree_util.tree_structure(grad1) == jax.tree_util.tree_structure(grad0)
        for a, b in zip(jax.tree_util.tree_leaves(grad1), jax.tree_util.tree_leaves(grad0)):
            np.testing.assert_allclose(a, b, atol=1e-6 * np.abs(b).max() + 1e-12)


def test_remat_modes():
    from promptreg_jax.model import remat_mode, remat_setting
    assert [remat_mode(r) for r in (False, True, "none", "levels", "blocks")] == \
        ["none", "levels", "none", "levels", "blocks"]
    assert [remat_setting(r) for r in ("none", "levels", "blocks", True)] == \
        [False, True, "blocks", True]
    # "auto" is the trainer's to resolve (train.choose_remat); a network traced by itself
    # recomputes nothing
    from promptreg_jax.model import build_model, traced_remat
    assert remat_mode("Auto") == "auto" and remat_setting("auto") == "auto"
    assert [traced_remat(r) for r in ("auto", "blocks", False)] == ["none", "blocks", "none"]
    vxm = dict(name="voxelmorph", image_size=[16, 16, 16])
    assert [build_model(dict(vxm, remat=r)).remat for r in ("auto", False, "none", True)] == \
        [False, False, False, True]
    with pytest.raises(ValueError, match="remat='layers'"):
        remat_mode("layers")
    with pytest.raises(ValueError, match="remat="):
        jax.eval_shape(PromptReg(channels=2, remat="layers").init, KEY,
                       jnp.zeros((1, 16, 16, 16, 1)), jnp.zeros((1, 16, 16, 16, 1)))


@pytest.mark.slow
def test_voxelmorph_runs():
    moving, fixed = _volumes(0, 1), _volumes(1, 1)
    model = get_model("voxelmorph")
    assert isinstance(model, VoxelMorph)
    params = jax.jit(model.init)(KEY, moving, fixed)
    # 2->16, 16->32, 3x 32->32 (enc/dec bottom), 3x 64->32, 48->32, 32->16, 16->16, head 16->3.
    sizes = [(2, 16), (16, 32), (32, 32), (32, 32), (32, 32), (64, 32), (64, 32), (64, 32),
             (48, 32), (32, 16), (16, 16), (16, 3)]
    assert count_params(params) == sum(27 * i * o + o for i, o in sizes)
    out = jax.jit(model.apply, compiler_options=FAST)(params, moving, fixed)
    assert out["flow"].shape == (1, 32, 32, 32, 3) and out["warped"].shape == (1, 32, 32, 32, 1)
    assert out["prompt_weights"].shape == (1, 0) and float(out["loss_ts"]) == 0.0
    assert np.all(np.isfinite(out["flow"])) and 0 < np.abs(out["flow"]).max() < 1e-2
    with pytest.raises(ValueError, match="divisible by 16"):
        jax.eval_shape(model.init, KEY, moving[:, :24, :24, :24], fixed[:, :24, :24, :24])


@pytest.mark.slow
def test_voxelmorph_remat_same_gradients():
    moving, fixed = _volumes(0, 1, size=16), _volumes(1, 1, size=16)
    params = jax.jit(VoxelMorph(int_steps=0).init)(KEY, moving, fixed)["params"]
    params = {**params, "flow": {**params["flow"], "kernel": params["flow"]["kernel"] * 400}}

    def grads(remat):
        model = VoxelMorph(int_steps=0, remat=remat)
        loss = lambda p: jnp.mean((model.apply({"params": p}, moving, fixed)["warped"] - fixed)
                                  ** 2)
        return jax.jit(jax.grad(loss), compiler_options=FAST)(params)

    g0, g1 = grads(False), grads(True)
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-6 * np.abs(b).max() + 1e-12)


def test_param_counts_at_160():
    """eval_shape only. Reference variant at Z=5, c=16: the SPEC's 19,131,084 (dead prompt_mlp
    and x_proj excluded) minus the attention's q and k (2 x 16,512), which are not created."""
    x = jax.ShapeDtypeStruct((1, 160, 160, 160, 1), jnp.float32)
    count = lambda **kw: count_params(jax.eval_shape(
        PromptReg(conv_impl="native", **kw).init, KEY, x, x))
    assert count(prompt_head="pooled_attention", num_tasks=5) == 19_131_084 - 2 * 16_512
    assert count(prompt_head="spatial", num_tasks=5) == 19_131_084 - 66_048
    assert count(use_prompt=False) == 8_922_444


def test_invalid_configurations_raise():
    x = jax.ShapeDtypeStruct((1, 20, 20, 20, 1), jnp.float32)
    with pytest.raises(ValueError, match="divisible by 8"):
        jax.eval_shape(PromptReg(**TINY).init, KEY, x, x)
    y = jax.ShapeDtypeStruct((1, 16, 16, 16, 1), jnp.float32)
    for bad, match in ((dict(schedule=(1, 1, 1)), "schedule"), (dict(prompt_head="mlp"),
                       "prompt_head"), (dict(conv_impl="fft"), "conv_impl")):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(PromptReg(**{**TINY, **bad}).init, KEY, y, y)
    with pytest.raises(ValueError, match="unknown model"):
        get_model("transmorph")

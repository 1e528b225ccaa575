"""PyTorch -> Flax conversion and numerical parity with the authors' network (32^3, Z=5, c=16).

Fixture note: its ``param/defconv{4,3,2,1}.weight`` equal ``perturbed/param/defconv*.weight`` (the
perturbation was written into the saved state dict), so ``output/flow`` and ``output/y_moved``
came from flow heads that are not in the file; they are compared only if a regenerated fixture
holds the original heads. The ``perturbed/*`` outputs exercise every part of the network (a
deformation of up to 6 voxels). The ``output/*`` prompt losses and the intermediates do not
depend on the heads and are compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import channels_last, fixtures_dir, load_fixture
from promptreg_jax.checkpoint import load_params
from promptreg_jax.convert import (convert_torch_state_dict, load_torch_checkpoint, main,
                                   model_kwargs)
from promptreg_jax.model import PromptReg, count_params

FIXTURE = "reference_promptreg_32.npz"
KEY = jax.random.key(0, impl="rbg")
REFERENCE = dict(channels=16, num_tasks=5, prompt_head="pooled_attention", temperature=0.5)
HEADS = [f"defconv{level}" for level in (4, 3, 2, 1)]
INTERMEDIATES = {"encoder_moving_level0": "encoder_moving_out3",
                 "c4_after_cconv_4": "c4_after_cconv_4", "task_prompt": "task_prompt",
                 "c4_after_prompt_fusion": "c4_after_prompt_fusion"}


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ref():
    return load_fixture(FIXTURE)


@pytest.fixture(scope="module")
def state(ref):
    return {k[len("param/"):]: ref[k] for k in ref.files if k.startswith("param/")}


def test_converted_tree_matches_the_model(ref, state):
    params = convert_torch_state_dict(state, num_tasks=5)
    x = jnp.asarray(channels_last(ref["input/moving"]))
    shapes = jax.eval_shape(PromptReg(**REFERENCE).init, KEY, x, x)["params"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), params, shapes)
    assert model_kwargs(params) == REFERENCE
    # Layouts: Conv3d (O,I,k,k,k) -> (k,k,k,I,O); ConvTranspose3d (I,O,k,k,k) -> (k,k,k,O,I).
    np.testing.assert_array_equal(params["cconv_4"]["block0"]["conv"]["kernel"][0, 1, 2, 5, 7],
                                  state["cconv_4.0.conv.weight"][7, 5, 0, 1, 2])
    np.testing.assert_array_equal(params["upconv3"]["upconv"]["kernel"][0, 1, 3, 6, 9],
                                  state["upconv3.upconv.weight"][9, 6, 0, 1, 3])
    np.testing.assert_array_equal(params["prompt_generator"]["cross_attention"]["v"]["kernel"],
                                  state["prompt_generator.cross_attention.v.weight"].T)


def test_plain_rdp_state_dict_converts_to_use_prompt_false(ref, state):
    rdp = {k: v for k, v in state.items()
           if not k.startswith(("prompt_generator.", "prompt_fusion_layer."))}
    params = convert_torch_state_dict(rdp)
    x = jnp.asarray(channels_last(ref["input/moving"]))
    shapes = jax.eval_shape(PromptReg(channels=16, use_prompt=False).init, KEY, x, x)["params"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes)
    assert model_kwargs(params) == {"channels": 16, "use_prompt": False}


def test_conversion_errors_name_the_keys(state):
    broken = dict(state)
    del broken["dconv3.conv.bias"]
    broken["decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"unknown keys: \['decoder.extra.weight'\].*"
                                         r"missing keys: \['dconv3.conv.bias'\]"):
        convert_torch_state_dict(broken)
    with pytest.raises(ValueError, match="SKB has 5 entries, num_tasks=4"):
        convert_torch_state_dict(state, num_tasks=4)


@pytest.mark.slow
@pytest.mark.parametrize("conv_impl", ["native", "depth_sum"])
def test_parity_with_reference(ref, state, conv_impl):
    model = PromptReg(**REFERENCE, conv_impl=conv_impl)
    apply = jax.jit(model.apply)
    moving = jnp.asarray(channels_last(ref["input/moving"]))
    fixed = jnp.asarray(channels_last(ref["input/fixed"]))
    task_id = jnp.array([int(ref["input/task_id"])])
    heads_saved = all(not np.array_equal(state[f"{h}.weight"], ref[f"perturbed/param/{h}.weight"])
                      for h in HEADS)
    if heads_saved:  # a fixture whose param/ holds the N(0, 1e-5) heads of output/*
        out = apply({"params": convert_torch_state_dict(state, 5)}, moving, fixed, task_id)
        assert np.abs(out["flow"] - channels_last(ref["output/flow"])).max() <= 1e-4
        assert _rel(out["warped"], channels_last(ref["output/y_moved"])) <= 1e-4
    perturbed = dict(state)
    perturbed.update({f"{h}.weight": ref[f"perturbed/param/{h}.weight"] for h in HEADS})
    out = apply({"params": convert_torch_state_dict(perturbed, 5)}, moving, fixed, task_id)
    flow_ref = channels_last(ref["perturbed/flow"])
    assert np.abs(flow_ref).max() > 5  # a real deformation
    assert np.abs(out["flow"] - flow_ref).max() <= 1e-4
    assert _rel(out["warped"], channels_last(ref["perturbed/y_moved"])) <= 1e-4
    assert _rel(out["loss_ort"], ref["output/orthogonal_loss"]) <= 1e-4
    assert _rel(out["loss_ts"], ref["output/classification_loss"]) <= 1e-4
    for ours, theirs in INTERMEDIATES.items():
        theirs = channels_last(ref[f"intermediate/{theirs}"])
        assert _rel(out["intermediates"][ours], theirs) <= 1e-4, ours
    # At init the RPG's cosines are ~0: the weights are nearly uniform.
    np.testing.assert_allclose(np.sum(out["prompt_weights"]), 1.0, atol=1e-6)
    assert np.abs(out["prompt_weights"] - 0.2).max() < 0.02


def test_load_and_cli_write_run_folder(ref, tmp_path, capsys):
    path = str(fixtures_dir() / FIXTURE)
    loaded = load_torch_checkpoint(path)
    assert "input/moving" not in loaded and "warp.0.grid" in loaded
    out_dir = tmp_path / "params"
    main([path, str(out_dir)])
    printed = capsys.readouterr().out
    params = convert_torch_state_dict(loaded)
    assert f"wrote {count_params(params):,} parameters" in printed
    # A run folder that register/evaluate/init_from read, with the settings to rebuild the model.
    restored, meta, step = load_params(out_dir)
    assert step == 0 and meta["model"]["image_size"] == [32, 32, 32]
    assert meta["model"]["num_tasks"] == 5 and meta["model"]["prompt_head"] == "pooled_attention"
    np.testing.assert_array_equal(restored["defconv4"]["kernel"], params["defconv4"]["kernel"])
    np.testing.assert_array_equal(restored["prompt_generator"]["static_prompt"],
                                  params["prompt_generator"]["static_prompt"])
    with pytest.raises(SystemExit, match="not empty"):
        main([path, str(out_dir)])


def test_load_pth_checkpoint(state, tmp_path):
    torch = pytest.importorskip("torch")
    sd = {f"module.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    torch.save({"model_state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = load_torch_checkpoint(str(tmp_path / "ckpt.pth"))
    assert set(loaded) == set(state)
    np.testing.assert_array_equal(loaded["defconv1.weight"], state["defconv1.weight"])

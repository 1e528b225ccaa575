"""Spatial sharding (``config.train.mesh``): a ``(data, space)`` step equals the 1-device step,
the volumes and the model's feature maps are really split along X, and a mesh that does not fit
the devices, the image or the batch is refused with one line.

Uses the 4 simulated CPU devices of conftest. Three programs are compiled (1 device, data=2 x
space=2, data=1 x space=4), each once; ``conv_impl="native"`` as on accelerators (the CPU's
``depth_sum`` form loops over X planes, which GSPMD can only gather).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from promptreg_jax import model as model_lib, optim, sharding, train
from train_test import _flat

SIZE = (32, 16, 16)   # X = 32: every level splits over space = 4 (32 = 8 x 4)
BATCH = 2


def _setup(tmp_path):
    config = tiny_config(tmp_path)          # demo.py:tiny: c = 4, schedule (1,1,1,1), 4 squarings
    config.data.image_size = SIZE
    config.model.conv_impl = "native"
    model = model_lib.build_model(model_lib.model_settings(config, num_tasks=5))
    # The trainer's AMSGrad with eps 1: its first step is -lr g / (|g| + 1), linear in the
    # gradient where |g| << 1, so the parameters' change compares the gradients. (With the usual
    # eps, 1e-8, that step is -lr sign(g) for nearly every value: it compares the gradients' signs
    # only, and a near-zero gradient's sign is round-off, which differs between reduction orders;
    # jax 0.11.2 flipped 0.3 % of them.) lr 1e3 keeps the change far above the parameters'
    # float32 resolution for leaves whose gradients are 1e-6.
    schedule = optim.make_schedule(1e3, 4, config.optim.power, 1, "step")
    tx = optim.make_optimizer(schedule, eps=1.0)
    weights = {k: float(config.loss[k]) for k in ("mind", "smooth", "ort", "ts")}
    rng = np.random.default_rng(0)
    batch = {"moving": rng.random((BATCH, *SIZE, 1), np.float32),
             "fixed": rng.random((BATCH, *SIZE, 1), np.float32),
             "task_id": np.array([1, 3], np.int32)}
    return config, model, tx, schedule, weights, batch


def _assert_same_gradients(a, b, rtol=1e-3, global_atol=1e-6):
    """Two steps' gradients (here: parameter changes proportional to them), leaf by leaf, within
    ``rtol`` of the leaf's largest value plus ``global_atol`` of the largest anywhere.

    The second term is float32 round-off: a reduction's error scales with the terms it sums, and
    a leaf whose gradient is a small difference of large terms (1e-6 to 1e-5 of the largest here:
    the decoder's full-resolution kernels behind flow heads initialised at 1e-5, biases before
    instance norm) carries an error set by those terms. Measured (2026-12-04): at most 0.34 of
    this bound under jax 0.11.2 (``cconv_1``'s second kernel, space=4), 0.005 under 0.10.2.
    """
    assert set(a) == set(b)
    top = max(float(np.abs(v).max()) for v in a.values())
    for k in a:
        atol = rtol * float(np.abs(a[k]).max()) + global_atol * top
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=atol, err_msg=k)


def _conv_outputs(hlo: str):
    """Shapes of the 5-D channels-last convolution results (``...->b012f``: batch, X, Y, Z,
    features) in a compiled, per-device HLO text."""
    return [tuple(int(d) for d in m.group(1).split(","))
            for m in re.finditer(r"= f32\[(\d+,\d+,\d+,\d+,\d+)\]\{[^}]*\} convolution\("
                                 r"[^\n]*dim_labels=\w+->b012f", hlo)]


def _run(mesh, model, tx, schedule, weights, batch):
    init, step, abstract, state_sharding = train.make_train_fns(
        model, tx, schedule, weights, mesh, (1, *SIZE, 1), jax.random.PRNGKey(42))
    shardings = sharding.batch_shardings(mesh)
    # As the trainer feeds it: every process's whole pairs, each device taking its X slab.
    arrays = {k: jax.make_array_from_process_local_data(shardings[k], v, v.shape)
              for k, v in batch.items()}
    state = init(jax.random.PRNGKey(42))
    before = _flat(state["params"])  # the step donates the state
    compiled = step.lower(state, arrays).compile()
    new_state, metrics = compiled(state, arrays)
    moved = {k: v - before[k] for k, v in _flat(new_state["params"]).items()}  # -lr g/(|g|+1)
    return arrays, compiled, moved, jax.device_get(metrics)


def test_data_and_space_sharded_steps_equal_the_single_device_step(tmp_path):
    config, model, tx, schedule, weights, batch = _setup(tmp_path)
    results = {}
    for data, space in ((1, 1), (2, 2), (1, 4)):
        sizes = train.mesh_sizes(_with_mesh(config, f"data={data},space={space}"),
                                 num_devices=data * space)
        mesh = sharding.make_mesh(sizes, jax.devices()[:data * space])
        arrays, compiled, params, metrics = _run(mesh, model, tx, schedule, weights, batch)
        results[data, space] = params, metrics
        if space == 1:
            continue
        # The batch: volumes P("data", "space") (X split), task ids P("data").
        assert arrays["moving"].sharding.spec == P("data", "space")
        assert arrays["task_id"].sharding.spec == P("data")
        shard = arrays["fixed"].addressable_shards[0].data
        assert shard.shape == (BATCH // data, SIZE[0] // space, *SIZE[1:], 1)
        assert compiled.input_shardings[0][1]["moving"].spec == P("data", "space")
        # The feature maps inside the model: every convolution over a volume (encoders, decoder,
        # flow heads; forward and input gradients) runs on X / space planes per device.
        hlo = compiled.as_text()
        levels = {(SIZE[1] >> i, SIZE[2] >> i): SIZE[0] >> i for i in range(4)}
        feature_convs = [s for s in _conv_outputs(hlo)
                         if s[0] == BATCH // data and s[2:4] in levels]
        assert feature_convs, "no convolution over a feature map found in the HLO"
        for s in feature_convs:
            assert s[1] == levels[s[2:4]] // space, (s, space)
        full_res = [s for s in feature_convs if s[2:4] == SIZE[1:] and s[4] == 4]
        assert full_res and all(s[1] == SIZE[0] // space for s in full_res)
        # GSPMD's halo exchanges of the convolutions are there.
        assert "collective-permute" in hlo
    p1, m1 = results[1, 1]
    for key in ((2, 2), (1, 4)):
        p, m = results[key]
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5, err_msg=str(key))
        np.testing.assert_allclose(m["mind"], m1["mind"], rtol=1e-5, err_msg=str(key))
        np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-4, err_msg=str(key))
        _assert_same_gradients(p1, p)


def _with_mesh(config, text, **train_kw):
    config = config.copy_and_resolve_references()
    config.train.mesh = text
    for k, v in train_kw.items():
        config.train[k] = v
    return config


def _constrained(x):
    # A new function each time: make_jaxpr caches traces per function, not per context.
    return str(jax.make_jaxpr(lambda a: sharding.constrain_spatial(a))(x))


def test_constrain_spatial_is_a_no_op_without_a_space_axis():
    x = jnp.ones((2, 32, 16, 16, 4))
    assert "sharding_constraint" not in _constrained(x)
    for sizes in ({"data": 1, "space": 1}, {"data": 4, "space": 1}):
        mesh = sharding.make_mesh(sizes, jax.devices()[:sizes["data"]])
        with sharding.spatial_mesh(mesh):
            assert "sharding_constraint" not in _constrained(x)
    mesh = sharding.make_mesh({"data": 2, "space": 2}, jax.devices()[:4])
    with sharding.spatial_mesh(mesh):
        assert "P('data', 'space')" in _constrained(x)
        assert "sharding_constraint" not in _constrained(jnp.ones((2, 17, 16, 16, 4)))
    assert "sharding_constraint" not in _constrained(x)


def test_mesh_config_default_and_errors(tmp_path):
    config = tiny_config(tmp_path)                         # 16^3, batch 0 (one per data shard)
    assert config.train.mesh == "data=-1,space=1"
    assert train.mesh_sizes(config, 4) == {"data": 4, "space": 1}
    assert train.mesh_sizes(_with_mesh(config, "data=2,space=2"), 4) == {"data": 2, "space": 2}
    assert train.mesh_sizes(_with_mesh(config, "space=2"), 4) == {"data": 2, "space": 2}
    assert train.mesh_sizes(_with_mesh(config, "data=1,space=-1"), 2) == {"data": 1, "space": 2}
    cases = [
        ("data=2,space=3", {}, "data x space = 2 x 3 = 6 must equal the 4 devices"),
        ("data=3,space=-1", {}, "4 devices are not a multiple of the other axis (3)"),
        ("model=4", {}, "use e.g. 'data=-1,space=1'"),
        ("data=-1,space=-1", {}, "at most one axis may be -1"),
        ("data=1,space=4", {}, "image size 16 along X (config.data.image_size[0]) must be a "
                               "multiple of 8 x space = 32"),
        ("data=2,space=2", {"batch_size": 3}, "config.train.batch_size=3 must be a multiple of "
                                              "data=2"),
    ]
    for text, kw, message in cases:
        with pytest.raises(train.TrainingError) as e:
            train.mesh_sizes(_with_mesh(config, text, **kw), 4)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert str(e.value).startswith(f"config.train.mesh={text!r}: ")
    # The trainer refuses it before doing any work (no data written, nothing compiled).
    with pytest.raises(train.TrainingError, match="multiple of 8 x space = 32"):
        train.train_and_evaluate(_with_mesh(config, "data=1,space=4"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_folded_model_sharded_along_space_gives_the_one_device_numbers():
    """The TPU layout (``model.fold=8``: folded convs, norms and transposed conv) under a
    ``space=2`` mesh: same flow, loss and gradients as on one device, feature maps split on X."""
    rng = np.random.default_rng(5)
    size = (1, 32, 16, 16, 1)
    moving = jnp.asarray(rng.random(size), jnp.float32)
    fixed = jnp.asarray(rng.random(size), jnp.float32)
    model = model_lib.PromptReg(channels=4, num_tasks=2, schedule=(1, 1, 1, 1),
                                conv_impl="native", fold=8)
    params = model.init(jax.random.key(0), moving, fixed)["params"]
    params = jax.tree_util.tree_map(lambda p: p * 300 if p.ndim == 5 and p.shape[-1] == 3
                                    else p, params)   # flows of voxels, not 1e-5

    def loss(p, m, f):
        out = model.apply({"params": p}, m, f, jnp.array([1]))
        return jnp.mean((out["warped"] - f) ** 2) + 0.1 * jnp.mean(out["flow"] ** 2), out["flow"]

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (l1, flow1), g1 = jax.jit(grad_fn)(params, moving, fixed)
    mesh = sharding.make_mesh({"data": 1, "space": 2}, jax.devices()[:2])
    vol = jax.sharding.NamedSharding(mesh, P("data", "space"))
    with sharding.spatial_mesh(mesh):
        compiled = jax.jit(grad_fn).lower(params, jax.device_put(moving, vol),
                                          jax.device_put(fixed, vol)).compile()
    (l2, flow2), g2 = compiled(params, jax.device_put(moving, vol), jax.device_put(fixed, vol))
    assert float(jnp.abs(flow1).max()) > 0.3
    np.testing.assert_allclose(flow2, flow1, atol=2e-5)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    _assert_same_gradients(_flat(g1), _flat(g2))
    # the folded full-resolution maps (B, X, Y, Z / 8, 8 C) are convolved on X / 2 planes
    full = [s for s in _conv_outputs(compiled.as_text()) if s[2:4] == (16, 2)]
    assert full and all(s[1] == 16 for s in full), full

"""The trainer's device mesh: a ``data`` axis (pairs) and a ``space`` axis (one spatial axis).

``config.train.mesh`` reads ``"data=D,space=S"`` (``-1``: all the devices the other axis leaves;
a missing axis is 1). Volumes ``(B, X, Y, Z, C)`` are sharded ``P("data", "space")``: the batch
along ``data``, ``X`` along ``space``, so one pair is spread over ``S`` devices and GSPMD inserts
the convolutions' halo exchanges. ``X`` must be a multiple of ``8 S`` so that every level of the
network (full, 1/2, 1/4, 1/8 resolution) splits evenly.

Inside the model, :func:`constrain_spatial` pins a feature map to that sharding while the
trainer traces its step (:func:`spatial_mesh`); anywhere else (inference, tests, a mesh without
``space``, ``S = 1``) it returns its input untouched, so those programs are unchanged.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "space")
VOLUME_SPEC = P("data", "space")   # (B, X, Y, Z, C): batch on data, X on space
TASK_SPEC = P("data")              # (B,)


class MeshError(ValueError):
    """A ``train.mesh`` that cannot be built; the message says why in one line."""


def parse_mesh(text: str, num_devices: int) -> dict:
    """``"data=2,space=2"`` -> ``{"data": 2, "space": 2}`` for ``num_devices`` devices.

    One axis may be ``-1`` (the devices the other leaves); missing axes are 1, except that an
    empty text or one without ``data`` gives ``data`` every device ``space`` leaves.
    """
    sizes, seen = {"data": -1, "space": 1}, set()
    for part in filter(None, (p.strip() for p in str(text or "").split(","))):
        key, _, val = (s.strip() for s in part.partition("="))
        try:
            n = int(val)
        except ValueError:
            n = 0
        if key not in sizes or key in seen or (n < 1 and n != -1):
            raise MeshError(f"config.train.mesh={text!r}: use e.g. 'data=-1,space=1' or "
                            f"'data=2,space=2' (axes data and space, sizes >= 1 or one -1)")
        sizes[key] = n
        seen.add(key)
    if list(sizes.values()).count(-1) > 1:
        raise MeshError(f"config.train.mesh={text!r}: at most one axis may be -1")
    known = 1
    for n in sizes.values():
        known *= n if n != -1 else 1
    for key, n in sizes.items():
        if n == -1:
            if num_devices % known:
                raise MeshError(f"config.train.mesh={text!r}: {num_devices} devices are not a "
                                f"multiple of the other axis ({known})")
            sizes[key] = num_devices // known
    if sizes["data"] * sizes["space"] != num_devices:
        raise MeshError(f"config.train.mesh={text!r}: data x space = {sizes['data']} x "
                        f"{sizes['space']} = {sizes['data'] * sizes['space']} must equal the "
                        f"{num_devices} devices")
    return sizes


def check_mesh(sizes: dict, image_size, global_batch: int, text: str = "") -> None:
    """One-line errors for a mesh that cannot hold this image size and batch."""
    name = f"config.train.mesh={text!r}" if text else f"mesh data={sizes['data']},space={sizes['space']}"
    space, data = sizes["space"], sizes["data"]
    x = int(image_size[0])
    if x % (8 * space):
        raise MeshError(f"{name}: image size {x} along X (config.data.image_size[0]) must be a "
                        f"multiple of 8 x space = {8 * space}, so that every level of the "
                        f"network splits evenly over the space axis")
    if global_batch % data:
        raise MeshError(f"{name}: config.train.batch_size={global_batch} must be a multiple of "
                        f"data={data}")


def make_mesh(sizes: dict, devices=None) -> Mesh:
    """``Mesh(devices.reshape(data, space), ("data", "space"))``; with ``space == 1`` the
    data-only ``Mesh(devices, ("data",))``, so data-parallel programs stay exactly what they were
    (and share compiled programs with callers that build that mesh themselves)."""
    import numpy as np
    devices = np.asarray(jax.devices() if devices is None else devices)
    if sizes["space"] == 1:
        return Mesh(devices.reshape(sizes["data"]), ("data",))
    return Mesh(devices.reshape(sizes["data"], sizes["space"]), AXES)


def space_size(mesh) -> int:
    """The size of ``mesh``'s ``space`` axis (1 when it has none)."""
    return int(dict(mesh.shape).get("space", 1)) if mesh is not None else 1


def volume_spec(mesh) -> P:
    """How ``(B, X, Y, Z, C)`` arrays are sharded on ``mesh``: ``P("data", "space")`` with a
    ``space`` axis, else ``P("data")`` (a data-only mesh, as older callers build)."""
    return VOLUME_SPEC if "space" in mesh.axis_names else P("data")


def batch_shardings(mesh) -> dict:
    """The shardings of a training batch ``{"moving", "fixed", "task_id"}`` on ``mesh``."""
    vol = NamedSharding(mesh, volume_spec(mesh))
    return {"moving": vol, "fixed": vol, "task_id": NamedSharding(mesh, TASK_SPEC)}


_ACTIVE: list = []


@contextlib.contextmanager
def spatial_mesh(mesh):
    """While tracing inside, :func:`constrain_spatial` shards feature maps over ``mesh``'s
    ``space`` axis (nothing changes for a mesh whose ``space`` axis is 1 or absent)."""
    _ACTIVE.append(mesh if space_size(mesh) > 1 else None)
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_space_size() -> int:
    """The ``space`` size of the mesh :func:`spatial_mesh` is tracing for (1 outside it)."""
    return space_size(_ACTIVE[-1]) if _ACTIVE and _ACTIVE[-1] is not None else 1


def constrain_spatial(x):
    """``x (B, X, Y, Z, C)`` constrained to ``P("data", "space")`` under :func:`spatial_mesh`;
    a no-op elsewhere and for arrays whose X does not split evenly."""
    mesh = _ACTIVE[-1] if _ACTIVE else None
    if mesh is None or getattr(x, "ndim", 0) != 5:
        return x
    if x.shape[1] % space_size(mesh) or x.shape[0] % int(dict(mesh.shape)["data"]):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, VOLUME_SPEC))

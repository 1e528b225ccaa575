"""PyTorch PromptReg weights -> the Flax parameter tree of ``PromptReg``.

``convert_torch_state_dict`` maps the authors' ``state_dict`` (names and layouts of
``PromptReg.py``) onto ``PromptReg(prompt_head="pooled_attention", temperature=0.5,
num_tasks=Z, channels=c)``, the reference variant; a state dict without ``prompt_generator.*``
and ``prompt_fusion_layer.*`` gives the tree of ``use_prompt=False``. Layouts:

* ``Conv3d`` weight ``(out, in, k, k, k)`` -> ``kernel (k, k, k, in, out)``;
* ``ConvTranspose3d`` weight ``(in, out, 4, 4, 4)`` -> ``kernel (4, 4, 4, out, in)``, not flipped
  (``transpose_kernel=True`` convention, checked against a loop reference in the tests);
* ``Linear`` weight ``(out, in)`` -> ``kernel (in, out)``; SKB and template channels moved last.

Dropped: the never-used ``prompt_mlp.*`` and ``x_proj.*``, the attention's ``q``/``k`` (one key
makes its softmax 1), and the sampling-grid buffers ``*.grid``.

CLI: ``python -m promptreg_jax.convert IN.(npz|pth) OUT_DIR`` writes the tree with orbax.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Mapping

import numpy as np

# (PyTorch module-name pattern, Flax path template, layout). Encoders appear twice.
_ENC = r"(?P<enc>encoder_moving|encoder_fixed)"
_TABLE = (
    (_ENC + r"\.conv0\.conv", "{enc}/conv0/conv", "conv"),
    (_ENC + r"\.conv(?P<i>[123])\.0", "{enc}/conv{i}_0", "conv"),
    (_ENC + r"\.conv(?P<i>[123])\.1\.block\.2", "{enc}/conv{i}_1/conv", "conv"),
    (r"cconv_4\.(?P<i>[01])\.conv", "cconv_4/block{i}/conv", "conv"),
    (r"dconv4\.(?P<i>[01])\.conv", "dconv4/block{i}/conv", "conv"),
    (r"cconv_(?P<l>[123])\.conv\.(?P<i>[01])\.conv", "cconv_{l}/block{i}/conv", "conv"),
    (r"dconv(?P<l>[123])\.conv", "dconv{l}/conv", "conv"),
    (r"upconv(?P<l>[123])\.upconv", "upconv{l}/upconv", "conv_transpose"),
    (r"defconv(?P<l>[1234])", "defconv{l}", "conv"),
    (r"prompt_fusion_layer\.(?P<i>[01])\.conv", "prompt_fusion_layer/block{i}/conv", "conv"),
    (r"prompt_generator\.dynamic_fusion\.0", "prompt_generator/dynamic_fusion/block0/conv", "conv"),
    (r"prompt_generator\.dynamic_fusion\.3", "prompt_generator/dynamic_fusion/block1/conv", "conv"),
    (r"prompt_generator\.conv\.0", "prompt_generator/conv/block0/conv", "conv"),
    (r"prompt_generator\.fusion\.0", "prompt_generator/fusion/block0/conv", "conv"),
    (r"prompt_generator\.fusion\.3", "prompt_generator/fusion/block1/conv", "conv"),
    (r"prompt_generator\.cross_attention\.(?P<n>v|proj)", "prompt_generator/cross_attention/{n}",
     "linear"),
    (r"prompt_generator", "prompt_generator", "prompt"),  # .static_prompt, .prompt_template
)
_DROPPED = re.compile(r"(^prompt_generator\.(prompt_mlp|x_proj)\.|"
                      r"^prompt_generator\.cross_attention\.[qk]\.|\.grid$)")
_PROMPT_PARAMS = ("static_prompt", "prompt_template")


def _expected_names(with_prompt: bool) -> set[str]:
    """Every PyTorch parameter name the reference network has (dead ones excluded)."""
    mods = [f"{e}.conv0.conv" for e in ("encoder_moving", "encoder_fixed")]
    mods += [f"{e}.conv{i}.{s}" for e in ("encoder_moving", "encoder_fixed") for i in (1, 2, 3)
             for s in ("0", "1.block.2")]
    mods += [f"{m}.{i}.conv" for m in ("cconv_4", "dconv4") for i in (0, 1)]
    mods += [f"cconv_{l}.conv.{i}.conv" for l in (1, 2, 3) for i in (0, 1)]
    mods += [f"dconv{l}.conv" for l in (2, 3)] + [f"upconv{l}.upconv" for l in (1, 2, 3)]
    mods += [f"defconv{l}" for l in (1, 2, 3, 4)]
    names = {f"{m}.{p}" for m in mods for p in ("weight", "bias")}
    if with_prompt:
        pg = "prompt_generator."
        mods = [f"prompt_fusion_layer.{i}.conv" for i in (0, 1)]
        mods += [pg + m for m in ("dynamic_fusion.0", "dynamic_fusion.3", "conv.0", "fusion.0",
                                  "fusion.3", "cross_attention.v", "cross_attention.proj")]
        names |= {f"{m}.{p}" for m in mods for p in ("weight", "bias")}
        names |= {pg + p for p in _PROMPT_PARAMS}
    return names


def _convert_array(layout: str, leaf: str, a: np.ndarray) -> np.ndarray:
    if layout == "prompt":
        return np.moveaxis(a, 1, -1)  # (Z, C, x, y, z) -> (Z, x, y, z, C)
    if leaf == "bias":
        return a
    if layout == "conv":
        return np.transpose(a, (2, 3, 4, 1, 0))
    if layout == "conv_transpose":
        return np.transpose(a, (2, 3, 4, 1, 0))  # (I, O, k, k, k) -> (k, k, k, O, I)
    return a.T  # linear


def convert_torch_state_dict(state: Mapping[str, np.ndarray], num_tasks: int | None = None):
    """Converts a reference ``state_dict`` (name -> array) into a Flax ``params`` tree.

    Raises ``ValueError`` naming every unknown or missing key, or a ``num_tasks`` mismatch.
    """
    state = {k: np.asarray(v, np.float32) for k, v in state.items() if not _DROPPED.search(k)}
    with_prompt = any(k.startswith(("prompt_generator.", "prompt_fusion_layer.")) for k in state)
    expected = _expected_names(with_prompt)
    unknown, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unknown or missing:
        raise ValueError("state dict does not match the PromptReg reference network"
                         + (f"; unknown keys: {unknown}" if unknown else "")
                         + (f"; missing keys: {missing}" if missing else ""))
    params: dict = {}
    for name, array in state.items():
        module, leaf = name.rsplit(".", 1)
        for pattern, template, layout in _TABLE:
            match = re.fullmatch(pattern, module)
            if match:
                break
        else:  # unreachable: every expected name matches a row
            raise ValueError(f"no conversion rule for {name!r}")
        if layout == "prompt":
            out_leaf = leaf
        else:
            out_leaf = {"weight": "kernel", "bias": "bias"}[leaf]
        node = params
        for part in template.format(**match.groupdict()).split("/"):
            node = node.setdefault(part, {})
        node[out_leaf] = _convert_array(layout, leaf, array)
    if with_prompt and num_tasks is not None:
        z = params["prompt_generator"]["static_prompt"].shape[0]
        if z != num_tasks:
            raise ValueError(f"the checkpoint's SKB has {z} entries, num_tasks={num_tasks}")
    return params


def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Reads a state dict: ``.npz`` of arrays keyed by PyTorch names, or a ``.pth``/``.pt``.

    In an ``.npz`` with ``param/``-prefixed keys (the reference fixture) only those are kept,
    prefix removed. A ``.pth`` needs ``torch``; a state dict stored under ``model_state_dict`` or
    ``state_dict`` is unwrapped and a DataParallel ``module.`` prefix removed.
    """
    if path.endswith(".npz"):
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        if any(k.startswith("param/") for k in arrays):
            arrays = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
        return arrays
    if not path.endswith((".pth", ".pt")):
        raise ValueError(f"{path}: expected an .npz, .pth or .pt file")
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"reading {path} needs torch; or save the state dict as .npz "
                          f"(np.savez(f, **{{k: v.numpy() for k, v in sd.items()}}))") from err
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state_dict", "state_dict"):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
    return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in obj.items()}


def model_kwargs(params) -> dict:
    """The ``PromptReg`` fields that a converted tree needs (reference variant)."""
    kwargs = {"channels": int(params["encoder_moving"]["conv0"]["conv"]["kernel"].shape[-1])}
    if "prompt_generator" in params:
        kwargs.update(num_tasks=int(params["prompt_generator"]["static_prompt"].shape[0]),
                      prompt_head="pooled_attention", temperature=0.5)
    else:
        kwargs.update(use_prompt=False)
    return kwargs


def settings_for(params) -> dict:
    """Full model settings (as ``checkpoint.load_params`` returns them) for a converted tree."""
    from promptreg_jax.model import default_settings
    kw = model_kwargs(params)
    settings = dict(default_settings(), **kw)
    settings.setdefault("num_tasks", 0)
    if "prompt_generator" in params:  # the knowledge base is shaped by the input size / 8
        settings["image_size"] = [8 * int(n) for n in
                                  params["prompt_generator"]["static_prompt"].shape[1:4]]
    return settings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="PyTorch state dict: .npz (arrays by name) or .pth")
    parser.add_argument("out_dir", help="new run folder; register/evaluate/init_from accept it")
    parser.add_argument("--num-tasks", type=int, default=None, help="check the SKB size")
    args = parser.parse_args(argv)
    from promptreg_jax.checkpoint import Checkpointer
    from promptreg_jax.model import count_params

    out_dir = os.path.abspath(args.out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"error: {out_dir} exists and is not empty; choose a new directory")
    try:
        params = convert_torch_state_dict(load_torch_checkpoint(args.checkpoint), args.num_tasks)
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {args.checkpoint}: {e}")
    settings = settings_for(params)
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"))
    ckpt.save(0, {"params": params}, {"model": settings, "source": os.path.abspath(args.checkpoint)})
    ckpt.close()
    print(f"wrote {count_params(params):,} parameters to {out_dir}/checkpoints/0")
    print(f"model: PromptReg(**{model_kwargs(params)}), trained at {settings['image_size']}")


if __name__ == "__main__":
    main()

"""Compile-only fit and cost report of PromptReg's training step / inference on TPUs and GPUs.

    python benchmarks/aot.py --target tpu:v5e --size 160 --what train
    python benchmarks/aot.py --target gpu:a100-40 --size 160 --what infer --dtype bfloat16
    python benchmarks/aot.py --target tpu:v5e --mesh data=4 --what train --remat
    python benchmarks/aot.py --target tpu:v5e --mesh data=2,space=2 --size 160 --what train
    python benchmarks/aot.py --list

No accelerator is needed: the program is compiled for compile-only devices
(``jax.experimental.topologies.get_topology_desc``) on this host. It is the trainer's program:
``make_train_fns`` from ``promptreg_jax.train`` (state donated, batch sharded as the trainer's
``(data, space)`` mesh shards it: ``--mesh data=D,space=S`` splits the batch over D and each
volume's X axis over S devices, ``promptreg_jax.sharding``), the model built from the config's
model settings; ``--what infer`` compiles the shared inference program
(``evaluate_lib.predict_fn``) on the same mesh. Platform-dependent forms (``conv_impl="auto"``, the
trilinear sampler's backward) are chosen for the *target* (``conv.target_platform``), not for
this CPU host.

Printed per device (an SPMD program is the same on every device): fits or not, peak bytes,
argument/output/temporary bytes, FLOPs and bytes accessed (XLA's cost analysis), a roofline step
time ``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)`` from the figures in ``TARGETS`` below,
and the compile seconds; with ``--compile-profile`` also where the compile time went (the HLO
passes, the backend, the slowest passes; from XLA's and libtpu's own timing logs, captured during
the compile). The last line starts ``verdict: fits`` or ``verdict: does not fit``.
Exit code 0 in both cases; 2 when it could not compile or measure (one line says why).

Installs (optional extras, never runtime requirements):
    pip install -e '.[tpu-aot]'   # libtpu 0.0.42.* (the pin of jax 0.10.2's tpu extra), ~0.7 GB
    pip install -e '.[gpu-aot]'   # jax-cuda12-plugin + jax-cuda12-pjrt 0.10.2; no NVIDIA libraries

Caveats. TPU: a program over the chip's HBM fails to compile with RESOURCE_EXHAUSTED and the bytes
it needs; that is the authoritative verdict (reported as "does not fit", needed bytes given).
GPU: the compile never fails for memory, so the peak is compared with the card's memory here;
cuDNN autotuning does not run (workspace 0), so a real run needs somewhat more; XLA's GPU cost
analysis is empty, so FLOPs/bytes come from an XLA:CPU compile of the same traced program
(``--gpu-cost cpu``, default) and are marked as such. Roofline times are lower bounds from peak
figures, not predictions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGET_DIR = pathlib.Path(__file__).resolve().parent / "targets"
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Target:
    """One device kind: how to get compile-only devices and its published peak figures."""
    name: str
    platform: str          # "tpu", "gpu" or "cpu"
    description: str
    memory_bytes: float    # per device (chip / card)
    peak_flops_bf16: float  # per device, FLOP/s, dense
    peak_flops_f32: float   # per device, FLOP/s, what a float32 matmul/conv runs at by default
    hbm_bytes_per_s: float
    topology_gen: str = ""      # TPU: "v5e", "v4", ...
    topology_dims: int = 2      # TPU: 2 (v5e, v6e) or 3 (v4, v5p) chip-grid dimensions
    chip_config: str = ""       # TPU v4/v5p: "megacore" (one device per chip)
    target_config: str = ""     # GPU: GpuTargetConfigProto text file under benchmarks/targets
    source: str = ""


# Published peak figures (vendor spec sheets / product pages), per device.
#
# | target      | memory     | bf16 dense   | float32 as run  | HBM        |
# |-------------|------------|--------------|-----------------|------------|
# | tpu:v5e     | 16 GiB     | 197 TFLOP/s  | 197 (see below) | 819 GB/s   |
# | tpu:v4      | 32 GiB     | 275 TFLOP/s  | 275             | 1228 GB/s  |
# | tpu:v5p     | 95 GiB     | 459 TFLOP/s  | 459             | 2765 GB/s  |
# | tpu:v6e     | 32 GiB     | 918 TFLOP/s  | 918             | 1640 GB/s  |
# | gpu:a100-40 | 40 GiB     | 312 TFLOP/s  | 156 (TF32)      | 1555 GB/s  |
# | gpu:a100-80 | 80 GiB     | 312 TFLOP/s  | 156 (TF32)      | 2039 GB/s  |
# | gpu:h100    | 80 GiB     | 989 TFLOP/s  | 495 (TF32)      | 3352 GB/s  |
# | gpu:h200    | 141 GB     | 989 TFLOP/s  | 495 (TF32)      | 4800 GB/s  |
# | gpu:t4      | 15,360 MiB | 65 TFLOP/s   | 8.1 (no TF32)   | 320 GB/s   |
# | gpu:a4000   | 16 GB      | 76.7 TFLOP/s | 19.2 (FP32)     | 448 GB/s   |
# | cpu         | host RAM   | 0.2 TFLOP/s  | 0.2 (nominal)   | 20 GB/s    |
#
# float32 "as run": JAX's default precision runs float32 matmuls/convs as one bf16 pass on TPU
# and as TF32 on Ampere/Hopper, so those peaks apply. (A V100-16GB description failed here:
# sm_70 needs a ptxas this host's CUDA plugin lacks, "ptxas too old".) The cpu row
# is a nominal small host, only for testing this script's logic. TPU memory is the chip's HBM
# (the compiler reserves a little: v5e reports 15.75 GiB usable, and that check is the compiler's).
TARGETS = {t.name: t for t in [
    Target("tpu:v5e", "tpu", "TPU v5e (v5 lite) chip", 16 * GIB, 197e12, 197e12, 819e9,
           topology_gen="v5e", topology_dims=2, source="cloud.google.com/tpu/docs/v5e"),
    Target("tpu:v4", "tpu", "TPU v4 chip (megacore)", 32 * GIB, 275e12, 275e12, 1228e9,
           topology_gen="v4", topology_dims=3, chip_config="megacore",
           source="cloud.google.com/tpu/docs/v4"),
    Target("tpu:v5p", "tpu", "TPU v5p chip (megacore)", 95 * GIB, 459e12, 459e12, 2765e9,
           topology_gen="v5p", topology_dims=3, chip_config="megacore",
           source="cloud.google.com/tpu/docs/v5p"),
    Target("tpu:v6e", "tpu", "TPU v6e (Trillium) chip", 32 * GIB, 918e12, 918e12, 1640e9,
           topology_gen="v6e", topology_dims=2, source="cloud.google.com/tpu/docs/v6e"),
    Target("gpu:a100-40", "gpu", "NVIDIA A100-SXM4-40GB", 40 * GIB, 312e12, 156e12, 1555e9,
           target_config="gpu_a100-40.txtpb", source="nvidia.com A100 datasheet"),
    Target("gpu:a100-80", "gpu", "NVIDIA A100-SXM4-80GB", 80 * GIB, 312e12, 156e12, 2039e9,
           target_config="gpu_a100-80.txtpb", source="nvidia.com A100 datasheet"),
    Target("gpu:h100", "gpu", "NVIDIA H100 SXM5 80GB", 80 * GIB, 989e12, 495e12, 3352e9,
           target_config="gpu_h100.txtpb", source="nvidia.com H100 datasheet"),
    Target("gpu:h200", "gpu", "NVIDIA H200 SXM 141GB", 141e9, 989e12, 495e12, 4800e9,
           target_config="gpu_h200.txtpb", source="nvidia.com H200 datasheet"),
    Target("gpu:t4", "gpu", "NVIDIA T4 16GB", 15360 * 2 ** 20, 65e12, 8.1e12, 320e9,
           target_config="gpu_t4.txtpb", source="nvidia.com T4 datasheet"),
    Target("gpu:a4000", "gpu", "NVIDIA RTX A4000 16GB", 16 * 10 ** 9, 76.7e12, 19.2e12, 448e9,
           target_config="gpu_a4000.txtpb", source="nvidia.com RTX A4000 datasheet"),
    Target("cpu", "cpu", "this host (XLA:CPU; nominal peaks, for testing)", 0, 0.2e12, 0.2e12,
           20e9, source="nominal"),
]}


class AotError(RuntimeError):
    """The report could not be produced; the message says why in one line."""


# ----------------------------------------------------------------------------------- arithmetic
def parse_mesh(text: str) -> dict:
    """``"data=2,space=2"`` -> ``{"data": 2, "space": 2}`` (missing axes are 1)."""
    out = {"data": 1, "space": 1}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, _, val = part.partition("=")
        if key not in out or not val.isdigit() or int(val) < 1:
            raise AotError(f"--mesh {text!r}: use e.g. data=4 or data=2,space=2")
        out[key] = int(val)
    return out


def parse_size(text) -> tuple[int, int, int]:
    parts = [int(p) for p in str(text).lower().replace(",", "x").split("x") if p]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or any(p <= 0 or p % 8 for p in parts):
        raise AotError(f"--size {text!r}: one or three positive multiples of 8 (e.g. 160 or "
                       f"160x192x160)")
    return tuple(parts)


def tpu_topology(target: Target, chips: int) -> str:
    """The topology name of ``chips`` chips for ``get_topology_desc`` (e.g. ``v5e:2x2``)."""
    if chips < 1 or chips & (chips - 1):
        raise AotError(f"{target.name}: {chips} chips; use a power of two")
    dims = [1] * target.topology_dims
    i, n = 0, chips
    while n > 1:  # grow the axes in turn: 2 -> 1x2 (2D) / 1x1x2 (3D), 4 -> 2x2 / 1x2x2, ...
        dims[-1 - (i % len(dims))] *= 2
        n //= 2
        i += 1
    if target.topology_dims == 3 and chips == 4:
        dims = [2, 2, 1]
    return f"{target.topology_gen}:" + "x".join(map(str, dims))


def roofline(flops: float | None, bytes_accessed: float | None, target: Target,
             dtype: str) -> dict:
    """Lower bound of a step's time: ``max(flops / peak, bytes / bandwidth)`` (seconds)."""
    peak = target.peak_flops_bf16 if dtype == "bfloat16" else target.peak_flops_f32
    t_flops = flops / peak if flops is not None else None
    t_bytes = bytes_accessed / target.hbm_bytes_per_s if bytes_accessed is not None else None
    known = [t for t in (t_flops, t_bytes) if t is not None]
    time_s = max(known) if known else None
    bound = None
    if t_flops is not None and t_bytes is not None:
        bound = "compute" if t_flops >= t_bytes else "memory"
    return dict(time_s=time_s, compute_s=t_flops, memory_s=t_bytes, bound=bound,
                peak_flops=peak, hbm_bytes_per_s=target.hbm_bytes_per_s)


def fit_verdict(peak_bytes: float | None, capacity_bytes: float,
                needed_bytes: float | None = None) -> dict:
    """``fits`` when the peak is within the capacity; a compiler's refusal gives ``needed``."""
    if needed_bytes is not None:
        return dict(fits=False, needed=needed_bytes, capacity=capacity_bytes)
    if peak_bytes is None:
        raise AotError("no memory figure to decide the fit")
    return dict(fits=bool(peak_bytes <= capacity_bytes), needed=peak_bytes,
                capacity=capacity_bytes)


def parse_resource_exhausted(message: str) -> tuple[float | None, float | None]:
    """(needed, available) bytes from an XLA out-of-memory compile error, else Nones."""
    from promptreg_jax.memory import parse_resource_exhausted as parse
    return parse(message)


def _remat_setting(remat):
    from promptreg_jax.model import remat_setting
    return remat_setting(remat)


def _remat_word(remat) -> str:
    """``False`` -> off, ``True`` -> on (levels), ``"blocks"`` -> blocks."""
    return {False: "off", True: "on"}.get(remat, str(remat))


_TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    """``"21.12s"``, ``"4m38.9s"``, ``"980.3ms"``, ``"8 us"`` -> seconds."""
    return sum(float(value) * _TIME_UNITS[unit] for value, unit in
               re.findall(r"([\d.]+)\s*(ns|us|ms|m|h|s)(?![a-z])", text))


def parse_compile_log(text: str, top: int = 6) -> dict:
    """XLA's own timing lines (``--compile-profile``) -> ``{"hlo_passes_s", "passes", "stages"}``.

    ``passes``: the ``top`` slowest HLO passes as ``[name, seconds, calls]`` (each pass's time
    summed over its runs); ``hlo_passes_s``: all passes together (the optimisation pipeline;
    the rest of a compile is the backend: LLVM on CPU, the LLO passes and code generation on
    TPU); ``stages``: libtpu's stage durations (HLO_PASSES, BACKEND_PASSES, CODE_GENERATION,
    END_TO_END) in seconds where the log has them.
    """
    per, calls = {}, {}
    for name, value in re.findall(r"HLO pass: (\S+) time: ([\d.]+ ?(?:ns|us|ms|s))\b", text):
        per[name] = per.get(name, 0.0) + _seconds(value)
        calls[name] = calls.get(name, 0) + 1
    stages = {}
    for name, value in re.findall(r"\b([A-Z_]+) stage duration: ([\d.hms]+)", text):
        stages[name] = stages.get(name, 0.0) + _seconds(value)
    ranked = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return dict(hlo_passes_s=sum(per.values()) if per else None, stages=stages,
                passes=[[k, v, calls[k]] for k, v in ranked])


class _CapturedStderr:
    """Redirects file descriptor 2 (where XLA and libtpu log) to a temporary file; ``.text``."""

    def __enter__(self):
        import tempfile
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False


def fmt_bytes(b, unit="GiB"):
    if b is None:
        return "n/a"
    return f"{b / GIB:.2f} GiB" if unit == "GiB" else f"{b / 1e12:.3f} TB"


def format_report(r: dict) -> str:
    """The printed report from a result dict (``measure`` output); the last line is the verdict."""
    t = TARGETS[r["target"]]
    cost_note = f" ({r['cost_source']})" if r.get("cost_source") else ""
    lines = [
        f"target      {t.name}: {t.description}; {r['devices']} device(s)"
        + (f", topology {r['topology']}" if r.get("topology") else "")
        + f", mesh {r['mesh']}",
        f"program     {r['what']} at {'x'.join(map(str, r['size']))}, global batch {r['batch']}, "
        f"{r['dtype']}, remat {_remat_word(r['remat'])}, conv {r['conv_impl']}, "
        f"sampler {r['sampler']}" + (f", fold {r['fold']}" if r.get("fold") else "")
        + (f" on {r['fold_levels']} levels" if r.get("fold") and r.get("fold_levels", 1) > 1
           else "")
        + (f", schedule {','.join(map(str, r['schedule']))}" if r.get("schedule") else "")
        + f", config {r['config']}",
    ]
    if r.get("remat_auto"):
        lines.append("remat auto  " + "; ".join(
            f"{a['mode']}: {fmt_bytes(a['needed'])}, {'fits' if a['fits'] else 'does not fit'}"
            for a in r["remat_auto"])
            + f" -> {r.get('remat_auto_choice', r['remat_auto'][-1]['mode'])}"
            + ("" if any(a["fits"] for a in r["remat_auto"])
               else " (the least memory; nothing fits)"))
    v = r["verdict"]
    per = "each device" if r["devices"] > 1 else "device 0"
    if r.get("error_needed_bytes") is not None:
        lines.append(f"{per:<11} does not fit: the compiler needs {fmt_bytes(v['needed'])} of "
                     f"{fmt_bytes(v['capacity'])} ({r.get('error_line', '')})")
    else:
        m = r["memory"]
        lines.append(f"{per:<11} {'fits' if v['fits'] else 'does not fit'}: peak "
                     f"{fmt_bytes(m['peak'])} of {fmt_bytes(v['capacity'])} "
                     f"({100 * m['peak'] / v['capacity']:.0f}%)")
        lines.append(f"  memory    arguments {fmt_bytes(m['arguments'])}, outputs "
                     f"{fmt_bytes(m['outputs'])} (aliased {fmt_bytes(m['aliased'])}), "
                     f"temporaries {fmt_bytes(m['temporaries'])}")
    flops, nbytes = r.get("flops"), r.get("bytes_accessed")
    lines.append("  cost      " + (f"{flops / 1e12:.3f} TFLOP" if flops is not None else "FLOPs n/a")
                 + ", " + (f"{nbytes / 1e12:.3f} TB accessed" if nbytes is not None
                           else "bytes accessed n/a") + cost_note)
    rf = r["roofline"]
    if rf["time_s"] is not None:
        parts = []
        if rf["compute_s"] is not None:
            parts.append(f"{rf['compute_s']:.3f} s compute at {rf['peak_flops'] / 1e12:g} TFLOP/s")
        if rf["memory_s"] is not None:
            parts.append(f"{rf['memory_s']:.3f} s memory at "
                         f"{rf['hbm_bytes_per_s'] / 1e9:g} GB/s")
        lines.append(f"  roofline  {rf['time_s']:.3f} s per {r['what']} step "
                     f"({rf['bound'] or '?'}-bound: {'; '.join(parts)})")
    else:
        lines.append("  roofline  n/a (no cost analysis)")
    lines.append(f"  compile   {r['compile_s']:.0f} s"
                 + (f" (+{r['cost_compile_s']:.0f} s for the cost compile)"
                    if r.get("cost_compile_s") else ""))
    prof = r.get("compile_profile")
    if prof is not None:
        if prof["hlo_passes_s"] is None:
            lines.append("  profile   no pass timings in the compile log (set --compile-profile "
                         "on the command line, before jax starts)")
        else:
            stages = prof["stages"]
            backend = (f"backend {stages['BACKEND_PASSES']:.0f} s, code generation "
                       f"{stages.get('CODE_GENERATION', 0):.0f} s"
                       if "BACKEND_PASSES" in stages else
                       f"the rest (backend, code generation) "
                       f"{max(r['compile_s'] - prof['hlo_passes_s'], 0):.0f} s")
            lines.append(f"  profile   HLO passes {prof['hlo_passes_s']:.0f} s, {backend}; "
                         "slowest passes: " + ", ".join(f"{n} {t:.1f} s" for n, t, _ in
                                                        prof["passes"]))
    need = fmt_bytes(v["needed"])
    lines.append(("verdict: fits" if v["fits"] else "verdict: does not fit")
                 + f" ({r['what']}, {'x'.join(map(str, r['size']))}, {r['dtype']}, "
                 f"remat {_remat_word(r['remat'])}: {need} per device, "
                 f"{fmt_bytes(v['capacity'])} available on {t.name})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- devices
def get_devices(target: Target, n: int, topology: str | None = None):
    """``n`` compile-only devices of ``target`` (and the topology name used)."""
    import jax
    if target.platform == "cpu":
        devs = jax.devices("cpu")
        if len(devs) < n:
            raise AotError(f"cpu target: {n} devices wanted, {len(devs)} present (set XLA_FLAGS="
                           f"--xla_force_host_platform_device_count={n} before starting)")
        return devs[:n], None
    from jax.experimental import topologies
    if target.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise AotError("libtpu is not installed: pip install -e '.[tpu-aot]' (or "
                           "pip install 'libtpu==0.0.42.*'), then rerun")
        topology = topology or tpu_topology(target, n)
        kw = dict(platform="tpu")
        if target.chip_config:
            kw["chip_config_name"] = target.chip_config
        if n == 1:
            kw["chips_per_host_bounds"] = (1, 1, 1)
        devs = topologies.get_topology_desc(topology, **kw).devices
    else:
        if importlib.util.find_spec("jax_plugins.xla_cuda12") is None and \
                importlib.util.find_spec("jax_cuda12_plugin") is None:
            raise AotError("the CUDA compile plugin is not installed: pip install -e "
                           "'.[gpu-aot]' (jax-cuda12-plugin and jax-cuda12-pjrt 0.10.2)")
        text = (TARGET_DIR / target.target_config).read_text()
        topology = topology or f"1x1x{n}"
        devs = topologies.get_topology_desc(platform="cuda", target_config=text,
                                            topology=topology).devices
    if len(devs) < n:
        raise AotError(f"{target.name} topology {topology}: {len(devs)} devices, {n} wanted")
    return list(devs)[:n], topology


# ----------------------------------------------------------------------------------- programs
def load_config(path: str):
    spec = importlib.util.spec_from_file_location("aot_config", path)
    if spec is None or not pathlib.Path(path).exists():
        raise AotError(f"--config {path}: no such file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _model_helpers():
    """``(model_settings, build_model)`` wherever the project keeps them (model, then train)."""
    for modname in ("promptreg_jax.model", "promptreg_jax.train"):
        mod = importlib.import_module(modname)
        if hasattr(mod, "model_settings") and hasattr(mod, "build_model"):
            return mod.model_settings, mod.build_model
    raise AotError("found no model_settings/build_model in promptreg_jax.model or .train")


def build_program(config, what: str, mesh, batch: int):
    """``(jitted function, abstract arguments)`` of the trainer's step or the inference."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from promptreg_jax import evaluate_lib, optim, sharding
    from promptreg_jax.train import make_train_fns
    model_settings, build_model = _model_helpers()

    domains = [d for d in config.data.domains if not d.get("held_out", False)]
    num_tasks = max(len(domains), 1)
    settings = model_settings(config, num_tasks)
    model = build_model(settings)
    size = tuple(int(s) for s in config.data.image_size)
    shape = (1, *size, 1)
    batch_sharding = sharding.batch_shardings(mesh)  # the trainer's: P("data", "space") volumes
    vol = jax.ShapeDtypeStruct((batch, *size, 1), jnp.float32, sharding=batch_sharding["moving"])
    if what == "infer":
        repl = NamedSharding(mesh, P())
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                                                   jnp.zeros(shape), jnp.zeros((1,), jnp.int32)))
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                              params["params"])
        return evaluate_lib.predict_fn(model), (params, vol, vol)

    steps_per_epoch = max(int(config.data.pairs_per_domain) * num_tasks // batch, 1)
    total_steps = int(config.train.total_steps) or int(config.train.epochs) * steps_per_epoch
    schedule = optim.make_schedule(config.optim.lr, total_steps, config.optim.power,
                                   steps_per_epoch, config.optim.schedule_per)
    tx = optim.make_optimizer(schedule, amsgrad=config.optim.amsgrad)
    weights = {k: float(config.loss[k]) for k in ("mind", "smooth", "ort", "ts")}
    rng = jax.random.PRNGKey(int(config.seed))
    _, train_step, abstract, state_sharding = make_train_fns(
        model, tx, schedule, weights, mesh, shape, rng)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, state_sharding)
    batch_args = {"moving": vol, "fixed": vol,
                  "task_id": jax.ShapeDtypeStruct((batch,), jnp.int32,
                                                  sharding=batch_sharding["task_id"])}
    return train_step, (state, batch_args)


def _cost(compiled):
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return None, None
    flops, nbytes = ca.get("flops"), ca.get("bytes accessed")
    return (float(flops) if flops is not None else None,
            float(nbytes) if nbytes is not None else None)


def measure(args) -> dict:
    """Compiles the program for the target and returns every figure of the report."""
    import jax
    from promptreg_jax import conv, sharding, spatial
    from promptreg_jax.memory import compiled_memory
    from promptreg_jax import model as model_lib

    target = TARGETS[args.target]
    mesh_axes = parse_mesh(args.mesh)
    n = mesh_axes["data"] * mesh_axes["space"]
    devices, topology = get_devices(target, n, args.topology)

    config = load_config(args.config)
    size = parse_size(args.size) if args.size else tuple(int(s) for s in config.data.image_size)
    config.data.image_size = size
    if args.dtype:
        config.model.dtype = args.dtype
    if args.remat is not None:
        config.model.remat = args.remat
    if args.conv_impl:
        config.model.conv_impl = args.conv_impl
    if args.fold is not None:
        config.model.fold = args.fold
    if args.fold_levels is not None:
        with config.ignore_type():  # "auto" in the configs, an int from the remat search
            config.model.fold_levels = args.fold_levels
    if args.schedule:
        try:
            sched = tuple(int(x) for x in args.schedule.split(","))
        except ValueError:
            sched = ()
        if len(sched) != 4 or min(sched) < 1:
            raise AotError(f"--schedule {args.schedule!r}: give 4 counts >= 1, e.g. 2,2,3,1")
        config.model.schedule = sched
    batch = args.batch or mesh_axes["data"]
    if batch % mesh_axes["data"]:
        raise AotError(f"--batch {batch} must be a multiple of data={mesh_axes['data']}")
    try:  # the trainer's checks: X a multiple of 8 x space, the batch of data
        sharding.check_mesh(mesh_axes, size, batch, args.mesh)
    except sharding.MeshError as e:
        raise AotError(str(e).replace("config.train.mesh=", "--mesh ")) from None
    mesh = sharding.make_mesh(mesh_axes, devices)  # the trainer's (data, space) mesh

    platform = target.platform
    sampler = args.sampler or "auto"
    with conv.target_platform(platform), spatial.use_sampler(sampler):
        conv_resolved = conv.resolve_conv_impl(config.model.conv_impl)
        sampler_resolved = spatial.resolve_sampler()
        fold_resolved = model_lib.resolve_fold(config.model.get("fold", "auto"))
        fold_levels = model_lib.resolve_fold_levels(config.model.get("fold_levels", 1))
        fn, fn_args = build_program(config, args.what, mesh, batch)
        t0 = time.perf_counter()
        with sharding.spatial_mesh(mesh):  # feature maps split along X when space > 1
            lowered = fn.lower(*fn_args)
        result = dict(target=target.name, devices=n, topology=topology,
                      mesh=",".join(f"{k}={v}" for k, v in mesh_axes.items()),
                      volume_spec=str(fn_args[-1]["moving"].sharding.spec
                                      if args.what == "train" else fn_args[-1].sharding.spec),
                      what=args.what, size=list(size), batch=batch,
                      dtype=str(config.model.dtype), remat=_remat_setting(config.model.remat),
                      conv_impl=conv_resolved, sampler=sampler_resolved, fold=fold_resolved,
                      fold_levels=fold_levels,
                      schedule=[int(x) for x in config.model.schedule],
                      config=os.path.relpath(args.config, REPO) if os.path.isabs(args.config)
                      else args.config)
        capacity = args.capacity_gib * GIB if args.capacity_gib else target.memory_bytes
        if target.platform == "cpu" and not capacity:
            capacity = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        capture = _CapturedStderr() if args.compile_profile else contextlib.nullcontext()
        try:
            with capture:
                compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - XLA raises its own types
            msg = str(e)
            needed, available = parse_resource_exhausted(msg)
            if "RESOURCE_EXHAUSTED" not in msg or needed is None:
                raise AotError(f"compile failed: {msg.strip().splitlines()[0][:300]}") from None
            result["compile_s"] = time.perf_counter() - t0
            if args.compile_profile:
                result["compile_profile"] = parse_compile_log(capture.text)
            result["verdict"] = fit_verdict(None, available or capacity, needed_bytes=needed)
            result["error_needed_bytes"] = needed
            result["error_line"] = "RESOURCE_EXHAUSTED at compile"
            result["flops"], result["bytes_accessed"] = None, None
            try:  # the unoptimised program's cost, as a hint (not the compiled one's)
                ca = lowered.cost_analysis()
                if ca and ca.get("flops"):
                    result["flops"] = float(ca["flops"])
                    result["cost_source"] = "FLOPs of the unoptimised HLO"
            except Exception:  # noqa: BLE001
                pass
            if result["flops"] is None:
                result["cost_source"] = ("no cost analysis when the compile is refused; compile "
                                         "for a larger chip (e.g. --target tpu:v5p) for it")
            result["roofline"] = roofline(result.get("flops"), None, target, result["dtype"])
            return result
        result["compile_s"] = time.perf_counter() - t0
        if args.compile_profile:
            result["compile_profile"] = parse_compile_log(capture.text)
        result["memory"] = compiled_memory(compiled, target.platform)
        flops, nbytes = _cost(compiled)
        if flops is None and target.platform == "gpu" and args.gpu_cost == "cpu":
            # XLA:GPU has no cost analysis: the same traced program (GPU forms) compiled for
            # XLA:CPU devices of the same mesh shape.
            cpu = jax.devices("cpu")
            if len(cpu) >= n:
                cpu_mesh = sharding.make_mesh(mesh_axes, cpu[:n])
                fn2, fn_args2 = build_program(config, args.what, cpu_mesh, batch)
                t1 = time.perf_counter()
                with sharding.spatial_mesh(cpu_mesh):
                    flops, nbytes = _cost(fn2.lower(*fn_args2).compile())
                result["cost_compile_s"] = time.perf_counter() - t1
                result["cost_source"] = "from an XLA:CPU compile of the same program"
    result["flops"], result["bytes_accessed"] = flops, nbytes
    result["verdict"] = fit_verdict(result["memory"]["peak"], capacity)
    result["roofline"] = roofline(flops, nbytes, target, result["dtype"])
    return result


def measure_remat_auto(args) -> dict:
    """``measure``, where ``model.remat="auto"`` (the configs' default, or ``--remat auto``) is
    chosen as the trainer does (``train.choose_remat``): the training step is compiled with the
    least recomputation first and the first mode that fits the target is reported, with every
    mode tried (``remat_auto``). Inference has no backward pass: "auto" is "none" there."""
    from promptreg_jax.memory import first_fitting
    from promptreg_jax.model import remat_mode
    requested = args.remat if args.remat is not None else load_config(args.config).model.remat
    if remat_mode(requested) != "auto":
        return measure(args)
    if args.what != "train":
        return measure(argparse.Namespace(**{**vars(args), "remat": "none"}))

    from promptreg_jax.train import remat_candidates
    config = load_config(args.config)
    fold = args.fold if args.fold is not None else config.model.get("fold", "auto")
    fold_levels = args.fold_levels or config.model.get("fold_levels", 1)
    candidates = {label: (m, n) for label, m, n in remat_candidates(
        dict(fold=fold, fold_levels=fold_levels), TARGETS[args.target].platform)}

    results = {}

    def try_mode(label):
        m, n = candidates[label]
        r = results[label] = measure(argparse.Namespace(**{**vars(args), "remat": m,
                                                            "fold_levels": n}))
        return r["verdict"]["fits"], r["verdict"]["needed"], r

    mode, result, tried, fits = first_fitting(try_mode, tuple(candidates))
    if not fits:  # report the program that needs the least
        mode = min(tried, key=lambda t: float("inf") if t[1] is None else t[1])[0]
        result = results[mode]
    result["remat_auto"] = [dict(mode=m, needed=n, fits=fits and m == mode) for m, n in tried]
    result["remat_auto_choice"] = mode
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="tpu:v5e", help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--size", default=None, help="160 or 160x192x160 (default: the config's)")
    p.add_argument("--what", choices=("train", "infer"), default="train")
    p.add_argument("--config", default=str(REPO / "configs" / "all_domains.py"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--remat", dest="remat", nargs="?", const=True, default=None,
                   choices=(True, "auto", "none", "levels", "blocks"),
                   help="recompute in the backward pass: levels (bare --remat), blocks, or "
                        "auto (the least that fits, as the trainer chooses; the configs' "
                        "default)")
    p.add_argument("--no-remat", dest="remat", action="store_false")
    p.add_argument("--mesh", default="data=1", help="data=N[,space=M] (devices = N*M)")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: data size)")
    p.add_argument("--conv-impl", choices=("auto", "native", "depth_sum"), default=None)
    p.add_argument("--fold", choices=("auto", "0", "8"), default=None,
                   help="Z-fold of the full-resolution maps (model.fold; auto: 8 on TPU)")
    p.add_argument("--fold-levels", choices=("auto", "1", "2"), default=None,
                   help="levels folded (model.fold_levels): 1 full resolution, 2 also 1/2 "
                        "(by fold / 2), auto (with remat auto: 2 where 1 does not fit)")
    p.add_argument("--schedule", default=None,
                   help="the decoder's estimates per level, 1/8 to 1 (default: the config's, "
                        "2,2,3,1)")
    p.add_argument("--sampler", choices=("auto", "scatter", "cells", "gather", "mixed"),
                   default=None,
                   help="trilinear sampler form (auto: scatter on cpu, cells on TPU/GPU)")
    p.add_argument("--topology", default=None, help="override, e.g. v5e:2x2 or 1x1x4 (GPU)")
    p.add_argument("--capacity-gib", type=float, default=None, help="override device memory")
    p.add_argument("--gpu-cost", choices=("cpu", "none"), default="cpu")
    p.add_argument("--compile-profile", action="store_true",
                   help="time the compiler's passes (XLA's and libtpu's own logs) and report "
                        "where the compile time goes")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--list", action="store_true", help="print the targets and exit")
    args = p.parse_args(argv)
    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:<12} {t.description}: {t.memory_bytes / GIB:.0f} GiB, "
                  f"{t.peak_flops_bf16 / 1e12:g} TFLOP/s bf16, {t.peak_flops_f32 / 1e12:g} "
                  f"float32, {t.hbm_bytes_per_s / 1e9:g} GB/s")
        return 0
    try:
        if args.target not in TARGETS:
            raise AotError(f"--target {args.target!r}: choose one of {', '.join(TARGETS)}")
        result = measure_remat_auto(args)
    except AotError as e:
        print(f"error: {e}", flush=True)
        return 2
    print(format_report(result), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


def _setup_env(argv):
    """Before jax is imported: compile-only targets need only the CPU backend here; the cpu
    target with several mesh devices needs that many host devices."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    mesh = "data=1"
    for i, a in enumerate(argv):
        if a == "--mesh" and i + 1 < len(argv):
            mesh = argv[i + 1]
        elif a.startswith("--mesh="):
            mesh = a.split("=", 1)[1]
    try:
        m = parse_mesh(mesh)
        n = m["data"] * m["space"]
    except AotError:
        n = 1
    if "--compile-profile" in argv:  # XLA's pass timings: read at start-up, so set them here
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        vmodule = os.environ.get("TF_CPP_VMODULE", "")
        os.environ["TF_CPP_VMODULE"] = ",".join(x for x in (vmodule, "hlo_pass_pipeline=1") if x)
        tpu_args = os.environ.get("LIBTPU_INIT_ARGS", "")
        os.environ["LIBTPU_INIT_ARGS"] = (f"{tpu_args} --vmodule=hlo_pass_pipeline=1 "
                                          "--logtostderr --stderrthreshold=0").strip()
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _setup_env(sys.argv[1:])
    sys.exit(main())

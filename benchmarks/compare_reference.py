"""This port against the authors' PyTorch PromptReg, side by side on one machine, in one run.

    python benchmarks/compare_reference.py --reference-dir DIR [--sizes 64 96] [--modes train,infer]
        [--device cpu|gpu] [--repeats 3] [--rounds 2] [--reference-python PY] [--remat] [--malloc-trim]
        [--clear-caches] [--aot] [--port-env KEY=VALUE ...] [--port-configs default remat+trim ...] [--no-parity]
        [--json OUT.json]

``DIR`` is a checkout of https://github.com/xiehousheng/PromptReg (``PromptReg.py``, ``train.py``);
its code is imported at run time, nothing of it lives in this repository. It needs ``torch`` (the
CPU wheel: ``pip install torch``), in this interpreter or in ``--reference-python``. Without
either, the script says in one line that the reference was not run and why, and measures the
port alone.

Both sides get the same random inputs (``benchmarks/run.py``'s ``_batch``: batch 1, Z = 5 tasks,
c = 16). The *training step* is the authors' loop body (``PromptReg(inshape, task_total_number=5)``,
their ``MIND_loss`` + 0.1 ``Grad3d('l2')`` + 0.001 L_ort + 0.001 L_cls, ``Adam(amsgrad=True)``)
against the port's jitted step (``train.make_train_fns``, same weights, PyTorch-exact AMSGrad);
*inference* is one forward pass (``torch.no_grad``) against the jitted ``apply``. Each measurement
runs in its own process, so its peak RSS (``ru_maxrss``) is its own; the two sides alternate
(port, reference, port, reference: ``--rounds``), because absolute times on a shared machine swing
by several x between minutes. Per side: the median of all timed calls (after one warm-up per
process) and the largest process peak; for the port also the peak while compiling and the peak
while stepping (kernel high-water mark reset after compiling) and XLA's temp plan. FLOPs: PyTorch's
``FlopCounterMode`` (convs and matmuls) and XLA's ``cost_analysis()``.

Before timing, one process with both libraries converts the reference's initial weights
(``promptreg_jax.convert``, flow heads scaled up so that the flow is a real deformation) and checks
that both compute the same loss terms and gradient norm from them (``--no-parity`` skips it): the
reference in float32 on the CPU, the port on JAX's backend at ``highest`` matmul precision; on an
accelerator the port's figures at the default precision (TF32 convolutions on recent NVIDIA GPUs)
are printed beside them, unchecked.

``--device gpu`` runs the reference on CUDA (torch's defaults: TF32 convolutions, cuDNN
autotuning off) and expects the port on a GPU too (JAX's default backend; its own default precision
permits TF32 there too). Both sides then also report the GPU's peak memory (torch's
``max_memory_allocated``, JAX's ``peak_bytes_in_use``; each the allocator's high-water mark over
the process), and the ratio lines compare that instead of the host's RSS. The parity check still
runs the reference on the CPU.

``--aot`` (port config ``aot``) compiles the port in a child process that writes JAX's persistent
compilation cache, then loads every executable from it, so the measuring process never holds the
compiler's heap; that child's time and peak RSS and the cache hits / misses are reported beside it.

The run ends with one line per size and mode: ``ratio train 64: time 0.78x, peak RSS 0.95x``
(this port / the authors').
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (benchmarks/run.py: timing, peak-RSS and child helpers)

CHILD_TAG = bench.CHILD_TAG
REFERENCE_URL = "https://github.com/xiehousheng/PromptReg"
# The authors' train.py: loss = sim + smooth * 0.1 + orthogonal * 0.001 + classification * 0.001.
WEIGHTS = dict(mind=1.0, smooth=0.1, ort=0.001, ts=0.001)
NUM_TASKS, CHANNELS, LR = 5, 16, 1e-4
PARITY_HEAD_STD = 2e-3  # flow-head weights for the parity check (the init's 1e-5 barely moves)
MODES = ("train", "infer")
MEMORY_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
# Port configurations (--port-configs): "+"-joined options, "default" = none of them.
PORT_OPTIONS = {
    "remat": "model.remat=True (recompute each encoder / decoder level in the backward pass)",
    "trim": "malloc_trim(0) after compiling: the compiler's freed heap goes back to the kernel",
    "memsched": f"XLA_FLAGS={MEMORY_SCHEDULER} (XLA:CPU's memory-optimised HLO scheduler; "
                "the port's default now, memory.cpu_compiler_options)",
    "clear": "after compiling, jax.clear_caches() (traced jaxprs, lowered modules) + trim",
    "aot": "compile in a separate process first (JAX's persistent cache; "
           "promptreg_jax.memory), so the measuring process loads the executables",
}


# ------------------------------------------------------------------------------ the reference
def reference_status(reference_dir, python=None):
    """``(ok, reason)``: whether the reference can run, and if not, why (one line)."""
    if not reference_dir:
        return False, (f"no --reference-dir given (a checkout of {REFERENCE_URL}; "
                       f"git clone it and pass its path)")
    missing = [f for f in ("PromptReg.py", "train.py")
               if not os.path.isfile(os.path.join(reference_dir, f))]
    if missing:
        return False, (f"--reference-dir {reference_dir} has no {' or '.join(missing)} "
                       f"(expected a checkout of {REFERENCE_URL})")
    python = python or sys.executable
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    try:
        p = subprocess.run([python, "-c", probe], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot run {python}: {e}"
    if p.returncode:
        return False, (f"torch is not installed for {python} (pip install torch, the CPU wheel; "
                       f"or pass --reference-python)")
    return True, ""


def load_reference(reference_dir):
    """The authors' ``PromptReg`` class and their ``MIND_loss`` and ``Grad3d`` (from train.py).

    train.py imports their data pipeline (``dataset`` -> medpy, pandas) at module level; a stub
    ``dataset`` module stands in for it, since only the loss classes are used.
    """
    import types
    reference_dir = os.path.abspath(reference_dir)
    if reference_dir not in sys.path:
        sys.path.insert(0, reference_dir)
    if "dataset" not in sys.modules:
        stub = types.ModuleType("dataset")
        stub.MultiTaskRegistrationDataset = None
        sys.modules["dataset"] = stub
    import importlib.util
    spec = importlib.util.spec_from_file_location("promptreg_reference_train",
                                                  os.path.join(reference_dir, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    import PromptReg as model_module
    return model_module.PromptReg, train.MIND_loss, train.Grad3d


def _torch_device(args) -> str:
    """The reference's torch device: ``cuda`` for ``--device gpu``, else ``cpu``."""
    return "cuda" if args.device == "gpu" else "cpu"


def _torch_inputs(size, device="cpu"):
    import torch
    b = bench._batch(size, 1)
    to = lambda x: torch.from_numpy(x[..., 0][:, None].copy()).to(device)  # (B,X,Y,Z,1) -> (B,1,X,Y,Z)
    return (to(b["moving"]), to(b["fixed"]),
            torch.from_numpy(b["task_id"].astype("int64")).to(device))


def _reference_setup(size, reference_dir, device="cpu"):
    import torch
    PromptReg, MIND_loss, Grad3d = load_reference(reference_dir)
    torch.manual_seed(0)
    model = PromptReg(inshape=(size,) * 3, channels=CHANNELS,
                      task_total_number=NUM_TASKS).to(device)
    mind, grad = MIND_loss(device), Grad3d(penalty="l2")

    def loss_fn(moving, fixed, task_id):
        warped, flow, ort, cls = model(moving, fixed, task_id, is_training=True)
        terms = dict(mind=mind(warped, fixed), smooth=grad(flow), ort=ort, ts=cls)
        return sum(WEIGHTS[k] * v for k, v in terms.items()), terms, flow

    return model, loss_fn


def _torch_flops(fn):
    """FLOPs of ``fn()`` as PyTorch's FlopCounterMode counts them (convs, matmuls), or None."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception:  # an op without a formula, an older torch
        return None


def reference_child(mode, size, args):
    import torch
    device = _torch_device(args)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device gpu: torch sees no CUDA device (a CPU-only torch wheel?)")
    model, loss_fn = _reference_setup(size, args.reference_dir, device)
    moving, fixed, task_id = _torch_inputs(size, device)
    if mode == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=0, amsgrad=True)

        def call():
            loss = loss_fn(moving, fixed, task_id)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()
    else:
        model.eval()

        def call():
            with torch.no_grad():
                return model(moving, fixed, task_id, is_training=False)[:2]

    def block(x):  # CUDA runs asynchronously: a call ends when its kernels have
        if device == "cuda":
            torch.cuda.synchronize()
        return x
    median, times, last = bench._time_calls(call, args.repeats, block=block)
    peak = bench.process_peak_rss_gib()
    gpu = {}
    if device == "cuda":  # the caching allocator's high-water mark, the whole process's life
        gpu = dict(device_peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                   device_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30,
                   gpu=torch.cuda.get_device_name(),
                   cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                   tf32_conv=bool(torch.backends.cudnn.allow_tf32),
                   tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    if mode == "train":
        flops = _torch_flops(lambda: loss_fn(moving, fixed, task_id)[0].backward())
    else:
        flops = _torch_flops(lambda: call())
    out = dict(side="reference", mode=mode, size=size, median_s=median, times_s=times,
               rss_gib=peak, flops=flops, threads=torch.get_num_threads(), torch=torch.__version__,
               device=device, **gpu)
    if mode == "train":
        out["loss"] = float(last)
    return out


# --------------------------------------------------------------------------------- the port
def _port_model(args, **overrides):
    import jax.numpy as jnp
    from promptreg_jax.model import get_model
    kw = dict(channels=CHANNELS, num_tasks=NUM_TASKS, schedule=(2, 2, 3, 1),
              prompt_head="pooled_attention", temperature=0.5, conv_impl="auto",
              dtype=jnp.float32, remat=bool(args.remat))
    kw.update(overrides)
    return get_model("promptreg", **kw)


def _xla_flops(compiled):
    """XLA's FLOP count of the compiled program; None on a GPU, whose cost analysis leaves out
    the cuDNN convolutions (the 160^3 step: 0.058 TFLOP on an H200, against torch's 11.3)."""
    import jax
    if jax.default_backend() == "gpu":
        return None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:
        return None


def _malloc_trim():
    """Returns freed heap pages to the kernel (glibc); False where unavailable."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _port_setup(mode, size, args):
    """``(lower, make_call)``: the port's jitted step (or forward) ready to lower, and a function
    of the compiled executable returning the timed call."""
    import jax
    model = _port_model(args)
    b = bench._batch(size, 1)
    if mode == "train":
        from jax.sharding import Mesh
        from promptreg_jax import optim
        from promptreg_jax.train import make_train_fns
        schedule = optim.make_schedule(LR, 1000)
        tx = optim.make_optimizer(schedule, amsgrad=True)
        mesh = Mesh(jax.devices()[:1], ("data",))
        init_state, step_fn, _, _ = make_train_fns(model, tx, schedule, WEIGHTS, mesh,
                                                   (1, size, size, size, 1), jax.random.key(0))
        state = bench._block(init_state(jax.random.key(0)))
        batch = jax.device_put(b)
        holder = [state]

        def make_call(compiled):
            def call():  # the state is donated, so each step feeds the next
                holder[0], metrics = compiled(holder[0], batch)
                return metrics
            return call
        return lambda: step_fn.lower(holder[0], batch), make_call
    from promptreg_jax.memory import cpu_compiler_options
    params = jax.jit(lambda r: model.init(r, b["moving"], b["fixed"], b["task_id"])["params"])(
        jax.random.key(0))
    fwd = jax.jit(lambda p, m, f, t: {k: v for k, v in model.apply({"params": p}, m, f, t).items()
                                      if k in ("flow", "warped")},
                  compiler_options=cpu_compiler_options() or None)  # as evaluate_lib.predict_fn
    return (lambda: fwd.lower(params, b["moving"], b["fixed"], b["task_id"]),
            lambda compiled: lambda: compiled(params, b["moving"], b["fixed"], b["task_id"]))


def port_compile_child(mode, size, args):
    """``--aot``'s compiling process: compiles everything the measuring process will (writing
    JAX's persistent cache, set through the environment), then exits, its heap with it."""
    lower, _ = _port_setup(mode, size, args)
    t = time.perf_counter()
    lower().compile()
    return dict(side="port-compile", mode=mode, size=size, compile_s=time.perf_counter() - t)


def _precompile(mode, size, args):
    """Runs :func:`port_compile_child` in its own process with a fresh persistent cache, then
    points this process at that cache: its compiles become cache loads."""
    import tempfile
    from promptreg_jax import memory
    cache_dir = tempfile.mkdtemp(prefix="promptreg-aot-")
    cmd = _child_cmd(sys.executable, "port-compile", mode, size, args)
    r = memory.run_measured(cmd, env=dict(os.environ, **memory.compilation_cache_env(cache_dir)),
                            timeout=args.child_timeout)
    if r["returncode"] != 0:
        raise RuntimeError(f"compiling process failed ({r['returncode']}): {r['output'][-2000:]}")
    memory.use_compilation_cache(cache_dir)
    import jax
    events = {"cache_hits": 0, "cache_misses": 0}

    def count(name, **_):
        key = name.rsplit("/", 1)[-1]
        if key in events:
            events[key] += 1
    jax.monitoring.register_event_listener(count)
    return dict(aot_cache_dir=cache_dir, aot_compile_process_s=r["seconds"],
                aot_compile_process_rss_gib=r["peak_rss_gib"], aot_cache_events=events)


def port_child(mode, size, args):
    import jax
    aot = _precompile(mode, size, args) if args.aot else {}
    lower, make_call = _port_setup(mode, size, args)
    before_compile = bench.run_peak_rss_gib()
    t = time.perf_counter()
    compiled = lower().compile()
    compile_s = time.perf_counter() - t
    compile_peak = bench.run_peak_rss_gib()  # high-water mark so far: includes compiling
    if args.clear_caches:
        from promptreg_jax import memory
        memory.release_compile_caches()
    elif args.malloc_trim:
        _malloc_trim()
    reset = bench.reset_peak_rss()
    call = make_call(compiled)
    median, times, last = bench._time_calls(call, args.repeats)
    device = {k: v for k, v in bench.peak_memory().items() if k != "rss_gib"}
    out = dict(side="port", mode=mode, size=size, median_s=median, times_s=times,
               compile_s=compile_s, rss_gib=bench.process_peak_rss_gib(),
               peak_before_compile_gib=before_compile, rss_compile_gib=compile_peak,
               run_rss_gib=bench.run_peak_rss_gib() if reset else None,
               flops=_xla_flops(compiled), remat=bool(args.remat),
               malloc_trim=bool(args.malloc_trim), clear_caches=bool(args.clear_caches),
               jax=jax.__version__, backend=jax.default_backend(),
               **device, **aot, **bench.planned_memory(compiled), **bench.program_size(compiled))
    if mode == "train":
        out["loss"] = float(last["loss"])
    if aot:
        import shutil
        shutil.rmtree(aot["aot_cache_dir"], ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------- parity
def parity_child(size, args):
    """Same weights (converted), same inputs: both losses, per term, and the gradient norm."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from promptreg_jax import losses
    from promptreg_jax.convert import convert_torch_state_dict, model_kwargs
    model, loss_fn = _reference_setup(size, args.reference_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # flow heads large enough for a deformation of a few voxels
        for level in (1, 2, 3, 4):
            w = getattr(model, f"defconv{level}").weight
            w.copy_(PARITY_HEAD_STD * torch.randn(w.shape, generator=gen))
    moving, fixed, task_id = _torch_inputs(size)
    loss, terms, flow = loss_fn(moving, fixed, task_id)
    loss.backward()
    ref_gnorm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()
                                     if p.grad is not None)))
    ref = {k: float(v) for k, v in terms.items()}
    ref["loss"], ref["grad_norm"] = float(loss), ref_gnorm
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = convert_torch_state_dict(state, NUM_TASKS)
    port_model = _port_model(args, **model_kwargs(params))
    b = bench._batch(size, 1)

    def objective(p):
        out = port_model.apply({"params": p}, b["moving"], b["fixed"], b["task_id"])
        t = dict(mind=losses.mind_loss(out["warped"], b["fixed"]),
                 smooth=losses.smoothness_loss(out["flow"]), ort=out["loss_ort"],
                 ts=out["loss_ts"])
        return sum(WEIGHTS[k] * v for k, v in t.items()), (t, out["flow"])

    ref_flow = np.moveaxis(flow.detach().numpy(), 1, -1)

    def port_side():
        (total, (t, port_flow)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
            jax.tree.map(jnp.asarray, params))
        port = {k: float(v) for k, v in t.items()}
        port["loss"] = float(total)
        port["grad_norm"] = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))))
        rel = {k: abs(port[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref}
        return port, rel, float(np.abs(np.asarray(port_flow) - ref_flow).max())

    # The check: float32 against float32 (the reference runs on the CPU). On a GPU JAX's default
    # precision lets convolutions use TF32, as torch's does there: measured beside it, not checked.
    with jax.default_matmul_precision("highest"):
        port, rel, flow_diff = port_side()
    out = dict(size=size, reference=ref, port=port, rel_diff=rel,
               flow_max_abs=float(np.abs(ref_flow).max()), flow_max_abs_diff=flow_diff)
    if jax.default_backend() != "cpu":
        port_d, rel_d, flow_diff_d = port_side()
        out["default_precision"] = dict(backend=jax.default_backend(), port=port_d,
                                        rel_diff=rel_d, flow_max_abs_diff=flow_diff_d)
    return out


# Relative tolerances. The loss terms agree to ~2e-7 (32^3, flow up to 2.7 voxels); the gradient
# norm to ~3e-3 (not diagnosed; a candidate is the bilinear sampler's derivative at integer
# coordinates, where a left and a right derivative exist and the conventions may differ).
PARITY_TOL = dict(loss=1e-4, mind=1e-4, smooth=1e-3, ort=1e-4, ts=1e-3, grad_norm=1e-2)


def parity_ok(r) -> bool:
    return all(r["rel_diff"][k] <= tol for k, tol in PARITY_TOL.items())


# ------------------------------------------------------------------------------- formatting
def summarise(results):
    """Per side: median over every timed call of every process, largest process peak RSS."""
    if not results or any("error" in r for r in results):
        return None
    times = [t for r in results for t in r["times_s"]]
    out = dict(median_s=statistics.median(times), calls=len(times), processes=len(results),
               rss_gib=max(r["rss_gib"] for r in results), flops=results[0].get("flops"))
    for key in ("compile_s", "rss_compile_gib", "run_rss_gib", "plan_temp_gib",
                "device_peak_gib"):
        vals = [r[key] for r in results if r.get(key) is not None]
        if vals:
            out[key] = max(vals) if "gib" in key else statistics.median(vals)
    return out


def ratio_line(mode, size, port, ref, why_not=""):
    """``ratio train 64: time 0.78x, peak RSS 0.95x`` (this port / the authors'); on a GPU
    (both sides report their device's peak) ``peak GPU memory`` instead of the host's RSS."""
    if port is None or ref is None:
        return f"ratio {mode} {size}: n/a ({why_not or 'a side did not finish'})"
    if port.get("device_peak_gib") and ref.get("device_peak_gib"):
        memory = f"peak GPU memory {port['device_peak_gib'] / ref['device_peak_gib']:.2f}x"
    else:
        memory = f"peak RSS {port['rss_gib'] / ref['rss_gib']:.2f}x"
    return f"ratio {mode} {size}: time {port['median_s'] / ref['median_s']:.2f}x, {memory}"


def _fmt(v, spec, unit=""):
    return "-" if v is None else f"{v:{spec}}{unit}"


def table(rows, extra_rows=()):
    """Markdown table of the summaries: one row per (size, mode), then one per extra port
    configuration ``(size, mode, name, port, ref)``."""
    lines = ["| size, mode | authors' PyTorch | promptreg-jax | port: compile / peak while "
             "compiling / peak while stepping / XLA temp plan | FLOPs (torch / XLA) |",
             "| --- | --- | --- | --- | --- |"]
    items = [(size, mode, "", port, ref) for (size, mode), (port, ref) in rows.items()]
    items += [(size, mode, f" [{name}]", port, ref) for size, mode, name, port, ref in extra_rows]
    for size, mode, label, port, ref in items:
        side = lambda s: "not run" if s is None else (
            f"{s['median_s']:.2f} s, {s['rss_gib']:.2f} GiB"
            + (f" (GPU {s['device_peak_gib']:.2f} GiB)" if s.get("device_peak_gib") else ""))
        extra = "-" if port is None else (
            f"{_fmt(port.get('compile_s'), '.0f', ' s')} / "
            f"{_fmt(port.get('rss_compile_gib'), '.2f', ' GiB')} / "
            f"{_fmt(port.get('run_rss_gib'), '.2f', ' GiB')} / "
            f"{_fmt(port.get('plan_temp_gib'), '.2f', ' GiB')}")
        tf = lambda s: None if s is None or s.get("flops") is None else s["flops"] / 1e12
        flops = f"{_fmt(tf(ref), '.3f')} / {_fmt(tf(port), '.3f')} TFLOP"
        lines.append(f"| {size}^3 {mode}{label} | {side(ref)} | {side(port)} | {extra} | {flops} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- orchestration
def parse_port_config(text):
    """``"remat+trim"`` -> ``{"remat", "trim"}``; ``"default"`` -> ``set()``."""
    opts = set() if text == "default" else set(text.split("+"))
    bad = opts - set(PORT_OPTIONS)
    if bad or not text:
        raise ValueError(f"port config {text!r}: options are 'default' or a '+'-joined subset of "
                         f"{sorted(PORT_OPTIONS)}")
    return opts


def _child_cmd(python, kind, mode, size, args, config=frozenset()):
    cmd = [python, os.path.abspath(__file__), "--child", kind, "--child-mode", mode,
           "--sizes", str(size), "--repeats", str(args.repeats), "--device", args.device]
    if args.reference_dir:
        cmd += ["--reference-dir", os.path.abspath(args.reference_dir)]
    if args.remat or "remat" in config:
        cmd.append("--remat")
    if args.malloc_trim or "trim" in config:
        cmd.append("--malloc-trim")
    if args.clear_caches or "clear" in config:
        cmd.append("--clear-caches")
    if (args.aot or "aot" in config) and kind == "port":
        cmd.append("--aot")
    return cmd


def _port_env(args, config=frozenset()):
    env = dict(os.environ)
    for item in args.port_env:
        key, _, value = item.partition("=")
        env[key] = value
    if "memsched" in config:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + MEMORY_SCHEDULER).strip()
    return env


def _describe(r):
    if "error" in r:
        return f"not measured ({r['error']})"
    s = f"{r['median_s']:.3f} s (median of {len(r['times_s'])}), peak RSS {r['rss_gib']:.2f} GiB"
    if r.get("device_peak_gib") is not None:
        s += f", peak GPU memory {r['device_peak_gib']:.2f} GiB"
    if r["side"] == "port":
        s += (f" (compile {r['compile_s']:.0f} s; peak while compiling "
              f"{_fmt(r.get('rss_compile_gib'), '.2f', ' GiB')}, while stepping "
              f"{_fmt(r.get('run_rss_gib'), '.2f', ' GiB')}; XLA temp plan "
              f"{_fmt(r.get('plan_temp_gib'), '.2f', ' GiB')})")
        if r.get("aot_compile_process_s") is not None:
            s += (f"; compiled beforehand in its own process: {r['aot_compile_process_s']:.0f} s, "
                  f"peak RSS {r['aot_compile_process_rss_gib']:.2f} GiB, persistent cache "
                  f"{r['aot_cache_events']}")
    else:
        s += (f" ({r.get('gpu') or str(r['threads']) + ' threads'}, torch {r['torch']})")
    if r.get("loss") is not None:
        s += f", loss {r['loss']:.5f}"
    return s


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-dir", default=None, help=f"a checkout of {REFERENCE_URL}")
    ap.add_argument("--reference-python", default=None,
                    help="interpreter with torch for the reference side (default: this one)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                    help="where the reference runs (torch, 'gpu' = cuda); the port runs on "
                         "JAX's default backend, so set JAX_PLATFORMS to match")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    ap.add_argument("--rounds", type=int, default=2,
                    help="processes per side and measurement, alternating port / reference")
    ap.add_argument("--remat", action="store_true", help="the port with model.remat=True")
    ap.add_argument("--malloc-trim", action="store_true",
                    help="port: return the compiler's freed heap to the kernel before stepping")
    ap.add_argument("--clear-caches", action="store_true",
                    help="port: jax.clear_caches() and malloc_trim after compiling")
    ap.add_argument("--aot", action="store_true",
                    help="port: compile in a separate process first and load the executables "
                         "from JAX's persistent cache (the compiler's heap never in this process)")
    ap.add_argument("--port-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the port's processes (e.g. XLA_FLAGS=...)")
    ap.add_argument("--port-configs", nargs="+", default=["default"],
                    help="port configurations measured side by side, each 'default' or a "
                         "'+'-joined subset of " + ", ".join(PORT_OPTIONS) + "; the first one "
                         "gives the plain ratio lines")
    ap.add_argument("--no-parity", action="store_true", help="skip the same-loss check")
    ap.add_argument("--parity-size", type=int, default=None, help="default: the smallest size")
    ap.add_argument("--child-timeout", type=float, default=1800.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", default="train", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - set(MODES):
        ap.error(f"--modes: choose from {MODES}")
    if any(s % 8 or s <= 0 for s in args.sizes):
        ap.error("--sizes: positive multiples of 8")
    try:
        args.port_configs = [(c, frozenset(parse_port_config(c))) for c in args.port_configs]
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        size = args.sizes[0]
        if args.child == "parity":
            out = parity_child(size, args)
        elif args.child == "port-compile":
            out = port_compile_child(args.child_mode, size, args)
        elif args.child == "reference":
            out = reference_child(args.child_mode, size, args)
        else:
            out = port_child(args.child_mode, size, args)
        print(CHILD_TAG + json.dumps(out), flush=True)
        return out

    ref_python = args.reference_python or sys.executable
    ref_ok, why_not = reference_status(args.reference_dir, ref_python)
    print(f"compare_reference: port in {sys.executable}, reference in {ref_python}; "
          f"{os.cpu_count()} CPUs; reference on {args.device}; port env: {' '.join(args.port_env) or '-'}; "
          f"remat={args.remat} malloc_trim={args.malloc_trim}; port configs: "
          f"{', '.join(name for name, _ in args.port_configs)}", flush=True)
    if not ref_ok:
        print(f"reference not run: {why_not}; measuring the port alone", flush=True)
    results = dict(reference_run=ref_ok, reference_not_run_reason=why_not or None,
                   config=dict(sizes=args.sizes, modes=args.modes, repeats=args.repeats,
                               device=args.device,
                               rounds=args.rounds, remat=args.remat,
                               malloc_trim=args.malloc_trim, port_env=args.port_env,
                               port_configs=[name for name, _ in args.port_configs]),
                   parity=None, runs=[], summary={})
    failed = ""  # why the run fails at the end, if it does
    if ref_ok and not args.no_parity:
        size = args.parity_size or min(args.sizes)
        r = bench.run_json_child(_child_cmd(ref_python, "parity", "train", size, args),
                                 args.child_timeout, size=size)
        results["parity"] = r
        if "error" in r:
            failed = (f"parity not checked ({r['error']}): the comparison is not known to be "
                      f"like for like")
            print(f"parity {size}^3: not checked ({r['error']})", flush=True)
        else:
            ok = parity_ok(r)
            failed = "" if ok else ("parity check failed: the two sides do not compute the "
                                    "same loss")
            print(f"parity {size}^3 ({'OK' if ok else 'MISMATCH'}; same converted weights, "
                  f"max |flow| {r['flow_max_abs']:.2f} vx, max |flow diff| "
                  f"{r['flow_max_abs_diff']:.1e} vx): "
                  + ", ".join(f"{k} {r['reference'][k]:.6g} vs {r['port'][k]:.6g} "
                              f"(rel {r['rel_diff'][k]:.1e})" for k in PARITY_TOL), flush=True)
            if r.get("default_precision"):
                d = r["default_precision"]
                print(f"  the port at {d['backend']}'s default precision (not checked; TF32 "
                      f"convolutions on recent NVIDIA GPUs): max |flow diff| "
                      f"{d['flow_max_abs_diff']:.1e} vx, "
                      + ", ".join(f"{k} rel {d['rel_diff'][k]:.1e}" for k in PARITY_TOL),
                      flush=True)

    rows, extra_rows = {}, []
    primary = args.port_configs[0][0]
    for size in args.sizes:
        for mode in args.modes:
            per_side = {name: [] for name, _ in args.port_configs}
            per_side["reference"] = []
            for rnd in range(args.rounds):  # port, [more port configs,] reference, port, ...
                sides = [(name, opts) for name, opts in args.port_configs]
                sides += [("reference", None)] if ref_ok else []
                for name, opts in sides:
                    is_ref = opts is None
                    cmd = _child_cmd(ref_python if is_ref else sys.executable,
                                     "reference" if is_ref else "port", mode, size, args,
                                     opts or frozenset())
                    r = bench.run_json_child(cmd, args.child_timeout,
                                             env=None if is_ref else _port_env(args, opts),
                                             side="reference" if is_ref else "port",
                                             mode=mode, size=size)
                    r["round"], r["config"] = rnd, name
                    per_side[name].append(r)
                    results["runs"].append(r)
                    label = name if is_ref else f"port [{name}]"
                    print(f"{mode} {size}^3 round {rnd + 1} {label}: {_describe(r)}", flush=True)
            ref = summarise(per_side["reference"])
            results["summary"][f"{mode} {size}"] = dict(reference=ref)
            for name, _ in args.port_configs:
                port = summarise(per_side[name])
                results["summary"][f"{mode} {size}"][name if name != primary else "port"] = port
                if name == primary:
                    rows[(size, mode)] = (port, ref)
                else:
                    extra_rows.append((size, mode, name, port, ref))
    print("\n" + table(rows, extra_rows) + "\n", flush=True)
    why = "" if ref_ok else "reference not run"
    for size, mode, name, port, ref in extra_rows:
        print(ratio_line(mode, size, port, ref, why_not=why).replace(
            f"ratio {mode} {size}:", f"ratio {mode} {size} [{name}]:", 1), flush=True)
    for (size, mode), (port, ref) in rows.items():
        print(ratio_line(mode, size, port, ref, why_not=why), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {args.json}")
    if failed:
        print(failed, flush=True)
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()

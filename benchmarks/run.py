"""Speed and memory benchmarks for promptreg-jax: training step, inference, MIND loss, loader.

    python benchmarks/run.py [--sizes 64 96 128] [--include-160] [--what train,infer,conv,mind,loader]
                             [--repeats 3] [--conv-impl auto] [--dtype float32] [--remat]
                             [--json OUT.json]

Every figure is printed with the backend, the device count and the library versions. Timings on a
shared CPU are noisy, so each model step is also given as a *ratio to a matmul bound* measured in
the same run: ``ratio = measured seconds / (FLOPs / matmul FLOP/s)``, where the matmul rate is the
best of 3 numpy float32 2048^3 matmuls and the FLOPs are SPEC section 8's 3.76 TFLOP per 160^3
forward, scaled by volume (x3 for a training step, x batch). A ratio of 1 would mean the step runs
as fast as a dense matmul of the same FLOP count on this machine.

Each (size, train|infer) measurement runs in its own subprocess, so that its peak memory (process
``ru_maxrss`` on CPU, ``memory_stats()["peak_bytes_in_use"]`` on an accelerator) belongs to it
alone and a step that is too slow or too large (``--child-timeout``) cannot stop the run. On
Linux the peak RSS is also reported for the steps alone (``run_rss_gib``: the kernel's peak mark
is reset after compiling, which itself can take gigabytes), with XLA's planned temp memory
(``plan_temp_gib``, from ``compiled.memory_analysis()``). ``--what conv`` times the network's
costliest convolutions in both implementations (``model.conv_impl``) and checks they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

FWD_FLOPS_160 = 3.76e12  # SPEC section 8: PromptReg forward at 160^3 (torch FlopCounterMode)
CHILD_TAG = "BENCH_CHILD_JSON:"


# ------------------------------------------------------------------------------------------ helpers
def fwd_flops(size: int) -> float:
    return FWD_FLOPS_160 * (size / 160.0) ** 3


def matmul_bound(n: int = 2048, tries: int = 3) -> dict:
    """Best-of-``tries`` numpy float32 ``n^3`` matmul rate (FLOP = 2 n^3)."""
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up (thread pool, page faults)
    best = min(_timed(lambda: a @ b) for _ in range(tries))
    return dict(n=n, tries=tries, best_s=best, flops_per_s=2.0 * n ** 3 / best)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def environment() -> dict:
    import jax
    import jaxlib
    import numpy as np
    import flax
    return dict(backend=jax.default_backend(), device_count=jax.device_count(),
                devices=[str(d) for d in jax.devices()], jax=jax.__version__,
                jaxlib=jaxlib.__version__, flax=flax.__version__, numpy=np.__version__,
                python=platform.python_version(), cpu_count=os.cpu_count(),
                machine=platform.machine())


def env_line(env: dict) -> str:
    return (f"[backend={env['backend']} devices={env['device_count']} jax={env['jax']} "
            f"jaxlib={env['jaxlib']} flax={env['flax']} numpy={env['numpy']}]")


_PEAK_AT_RESET_GIB = 0.0  # the kernel's peak mark when reset_peak_rss() last cleared it


def process_peak_rss_gib() -> float:
    """This process's peak resident set size in GiB, over its whole life.

    ``ru_maxrss`` alone is not that on Linux: clearing the peak mark (:func:`reset_peak_rss`)
    lowers it too, so the mark at the last reset is kept and counted here.
    """
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, _PEAK_AT_RESET_GIB)


def peak_memory() -> dict:
    """Process peak RSS, plus the accelerator's peak bytes where the backend reports them."""
    import jax
    out = dict(rss_gib=process_peak_rss_gib())
    if jax.default_backend() != "cpu":
        stats = [d.memory_stats() or {} for d in jax.local_devices()]
        peaks = [s.get("peak_bytes_in_use") for s in stats]
        if all(p is not None for p in peaks):
            out["device_peak_gib"] = max(peaks) / 2 ** 30
    return out


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (Linux ``clear_refs`` 5), so that a later
    :func:`run_peak_rss_gib` covers only what runs afterwards (not XLA's compilation); the
    process's peak so far is kept for :func:`process_peak_rss_gib`."""
    global _PEAK_AT_RESET_GIB
    _PEAK_AT_RESET_GIB = max(_PEAK_AT_RESET_GIB, run_peak_rss_gib() or 0.0,
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_peak_rss_gib():
    """``VmHWM`` (peak RSS since the last reset) in GiB, or None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def planned_memory(compiled) -> dict:
    """XLA's buffer plan for a compiled program (temp = activations and workspace), in GiB."""
    try:
        ma = compiled.memory_analysis()
        return dict(plan_temp_gib=ma.temp_size_in_bytes / 2 ** 30,
                    plan_args_gib=ma.argument_size_in_bytes / 2 ** 30)
    except Exception:  # not every backend reports it
        return {}


def program_size(compiled) -> dict:
    """Instructions in a compiled program's optimised HLO. The loaded executable's host memory
    grows with it, not with the volume (XLA:CPU, the 64^3 training step with remat: 0.72 GiB
    resident after compiling 152,534 instructions, 0.51 GiB after 90,010; 0.63 GiB at 32^3)."""
    try:
        text = compiled.as_text()
    except Exception:  # not every backend gives the text
        return {}
    lines = text.splitlines()
    return dict(hlo_instructions=sum(line.startswith(("  %", "  ROOT ")) for line in lines))


def _block(x):
    import jax
    return jax.block_until_ready(x)


def _time_calls(call, repeats: int, block=None):
    """Calls ``call()`` ``repeats + 1`` times (the first is the warm-up), blocking on each result
    (``block``, default ``jax.block_until_ready``); returns (median seconds, the timed seconds,
    the last result)."""
    block = _block if block is None else block
    times, out = [], None
    for i in range(repeats + 1):
        t = time.perf_counter()
        out = block(call())
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


# ------------------------------------------------------------------------------ model measurements
def _model(args):
    import jax.numpy as jnp
    from promptreg_jax.model import get_model
    return get_model("promptreg", channels=16, num_tasks=5, schedule=(2, 2, 3, 1),
                     conv_impl=args.conv_impl, dtype=jnp.dtype(args.dtype), remat=args.remat)


def _batch(size: int, batch: int):
    import numpy as np
    rng = np.random.default_rng(0)
    shape = (batch, size, size, size, 1)
    return {"moving": rng.random(shape, dtype=np.float32),
            "fixed": rng.random(shape, dtype=np.float32),
            "task_id": (np.arange(batch) % 5).astype(np.int32)}


def bench_train(size: int, args) -> dict:
    """One jitted, sharded optimiser step (``train.make_train_fns``): compile, then median."""
    import jax
    from jax.sharding import Mesh
    from promptreg_jax import optim
    from promptreg_jax.train import make_train_fns
    model = _model(args)
    schedule = optim.make_schedule(1e-4, 1000)
    tx = optim.make_optimizer(schedule)
    weights = dict(mind=1.0, smooth=1.0, ort=0.1, ts=0.1)
    mesh = Mesh(jax.devices(), ("data",))
    nb = jax.device_count()
    batch = jax.device_put(_batch(size, nb))
    init_state, train_step, _, _ = make_train_fns(model, tx, schedule, weights, mesh,
                                                  (1, size, size, size, 1), jax.random.key(0))
    t = time.perf_counter()
    state = _block(init_state(jax.random.key(0)))
    init_s = time.perf_counter() - t
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    t = time.perf_counter()
    step = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    reset = reset_peak_rss()
    holder = [state]

    def call():  # the state is donated, so each step feeds the next
        holder[0], metrics = step(holder[0], batch)
        return metrics

    step_s, times, metrics = _time_calls(call, args.repeats)
    flops = 3 * fwd_flops(size) * nb
    return dict(size=size, batch=nb, init_s=init_s, compile_s=compile_s, step_s=step_s,
                step_times_s=times, flops=flops, params=int(n_params), remat=bool(args.remat),
                loss=float(metrics["loss"]), run_rss_gib=run_peak_rss_gib() if reset else None,
                **planned_memory(step), **peak_memory(), **program_size(step))


def bench_infer(size: int, args) -> dict:
    """The jitted forward pass (flow and warped image) for one pair."""
    import jax
    from promptreg_jax.memory import cpu_compiler_options
    model = _model(args)
    b = _batch(size, 1)
    params = jax.jit(lambda r: model.init(r, b["moving"], b["fixed"], b["task_id"])["params"])(
        jax.random.key(0))
    # Compiled as evaluate_lib.predict_fn compiles it (XLA:CPU's memory-optimised scheduler).
    fwd = jax.jit(lambda p, m, f, t: {k: v for k, v in model.apply({"params": p}, m, f, t).items()
                                      if k in ("flow", "warped")},
                  compiler_options=cpu_compiler_options() or None)
    t = time.perf_counter()
    compiled = fwd.lower(params, b["moving"], b["fixed"], b["task_id"]).compile()
    compile_s = time.perf_counter() - t
    reset = reset_peak_rss()
    pair_s, times, _ = _time_calls(
        lambda: compiled(params, b["moving"], b["fixed"], b["task_id"]), args.repeats)
    return dict(size=size, compile_s=compile_s, pair_s=pair_s, pair_times_s=times,
                flops=fwd_flops(size), run_rss_gib=run_peak_rss_gib() if reset else None,
                **planned_memory(compiled), **peak_memory(), **program_size(compiled))


# --------------------------------------------------------------------------------- convolutions
def conv_shapes(size: int):
    """The costliest convs of PromptReg (c = 16) at ``size``: (label, spatial, Cin, Cout, count)."""
    s = size
    return [("full-res decoder 48->48", s, 48, 48, 2), ("1/2 decoder 96->96", s // 2, 96, 96, 6),
            ("1/4 decoder 192->192", s // 4, 192, 192, 4), ("flow head 48->3", s, 48, 3, 1),
            ("encoder 1->16", s, 1, 16, 2)]


def bench_conv(size: int, args) -> dict:
    """Forward and forward+backward (input and kernel) of each costly conv, native vs depth-sum."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from promptreg_jax.conv import conv3d
    rng = np.random.default_rng(2)
    rows = []
    for label, n, cin, cout, count in conv_shapes(size):
        x = jnp.asarray(rng.standard_normal((1, n, n, n, cin), dtype=np.float32))
        k = jnp.asarray(0.1 * rng.standard_normal((3, 3, 3, cin, cout), dtype=np.float32))
        row = dict(label=label, size=n, cin=cin, cout=cout, count=count,
                   gflop=2 * 27 * cin * cout * n ** 3 / 1e9)
        outs = {}
        for impl in ("native", "depth_sum"):
            f = lambda x, k, impl=impl: conv3d(x, k, 1, ((1, 1),) * 3, impl)
            fwd = jax.jit(f)
            bwd = jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) ** 2), argnums=(0, 1)))
            outs[impl] = (np.asarray(fwd(x, k)), [np.asarray(g) for g in bwd(x, k)])
            row[impl] = {name: _time_calls(lambda fn=fn: fn(x, k), args.repeats)[0]
                         for name, fn in (("fwd_s", fwd), ("fwd_bwd_s", bwd))}
        rel = lambda a, b: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
        row["max_rel_diff"] = max([rel(outs["depth_sum"][0], outs["native"][0])]
                                  + [rel(a, b) for a, b in zip(outs["depth_sum"][1],
                                                               outs["native"][1])])
        rows.append(row)
    return dict(size=size, convs=rows)


# --------------------------------------------------------------------------------- MIND comparison
def _box_mean_full(x, radius: int):
    """The straightforward box filter: one (2r+1)^3 ``reduce_window`` after edge padding."""
    import jax
    import jax.numpy as jnp
    k = 2 * radius + 1
    x = jnp.pad(x, [(0, 0)] + [(radius, radius)] * 3 + [(0, 0)], mode="edge")
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, k, k, k, 1), (1,) * 5, "VALID")
    return x / float(k ** 3)


def mind_ssc_straightforward(image, radius: int = 2, dilation: int = 2):
    """``losses.mind_ssc`` with the full-window box filter (the baseline for the separable one)."""
    import jax
    import jax.numpy as jnp
    from promptreg_jax.losses import MIND_EDGES
    d = dilation
    x = image[..., 0]
    shape = x.shape[1:]
    xp = jnp.pad(x, [(0, 0)] + [(d, d)] * 3, mode="edge")

    def shifted(offset):
        s = [d + d * o for o in offset]
        return xp[:, s[0]:s[0] + shape[0], s[1]:s[1] + shape[1], s[2]:s[2] + shape[2]]

    ssd = _box_mean_full(jnp.stack([(shifted(a) - shifted(b)) ** 2 for a, b in MIND_EDGES], -1),
                         radius)
    mind = ssd - jnp.min(ssd, axis=-1, keepdims=True)
    var = jnp.mean(mind, axis=-1, keepdims=True)
    var_mean = jnp.maximum(jax.lax.stop_gradient(jnp.mean(var, axis=(1, 2, 3, 4), keepdims=True)),
                           1e-12)
    var = jnp.clip(var, 0.001 * var_mean, 1000.0 * var_mean)
    return jnp.exp(-mind / var)


def bench_mind(size: int, args) -> dict:
    """MIND loss forward+backward (gradient w.r.t. the warped image): fast vs straightforward."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from promptreg_jax import losses
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.random((1, size, size, size, 1), dtype=np.float32))
    f = jnp.asarray(rng.random((1, size, size, size, 1), dtype=np.float32))
    impls = {
        "fast": losses.mind_loss,
        "straightforward": lambda a, b: jnp.mean((mind_ssc_straightforward(a)
                                                  - mind_ssc_straightforward(b)) ** 2),
    }
    out, grads = dict(size=size), {}
    for name, fn in impls.items():
        vg = jax.jit(jax.value_and_grad(fn))
        t = time.perf_counter()
        compiled = vg.lower(w, f).compile()
        compile_s = time.perf_counter() - t
        median, times, (val, g) = _time_calls(lambda: compiled(w, f), args.repeats)
        grads[name] = (float(val), np.asarray(g))
        out[name] = dict(compile_s=compile_s, fwd_bwd_s=median, times_s=times)
    out["speedup"] = out["straightforward"]["fwd_bwd_s"] / out["fast"]["fwd_bwd_s"]
    out["max_abs_loss_diff"] = abs(grads["fast"][0] - grads["straightforward"][0])
    out["max_abs_grad_diff"] = float(np.max(np.abs(grads["fast"][1] - grads["straightforward"][1])))
    return out


# --------------------------------------------------------------------------------------- loader
def prepare_loader_data(tmp: str, subjects: int = 4):
    import ml_collections
    from promptreg_jax.data import VolumeCache, domains_from_config, ensure_synthetic, read_pairs
    t = time.perf_counter()
    entries = ensure_synthetic(os.path.join(tmp, "synthetic"), size=48, subjects=subjects)
    gen_s = time.perf_counter() - t
    cfg = ml_collections.ConfigDict({"data": {"domains": entries}})
    train = {d: list(read_pairs(d)[0]) for d in domains_from_config(cfg.data)}
    return train, VolumeCache(os.path.join(tmp, "cache")), gen_s


def bench_loader(size: int, train, cache, args) -> dict:
    """Pairs per second from the (here built, then warm) cache, in-process (``num_workers=0``)."""
    from promptreg_jax.data import loader_throughput
    t = time.perf_counter()
    loader_throughput(train, cache, (size,) * 3, batch_size=1, num_batches=1, warmup_batches=0)
    build_s = time.perf_counter() - t  # cache build for this size (+ one batch)
    stats = loader_throughput(train, cache, (size,) * 3, batch_size=1,
                              num_batches=args.loader_batches)
    return dict(size=size, cache_build_s=build_s, **stats)


# ----------------------------------------------------------------------------------- orchestration
def run_child(kind: str, size: int, args) -> dict:
    """Runs one model measurement in a fresh process (own peak memory, own time limit)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--sizes", str(size),
           "--repeats", str(args.repeats), "--conv-impl", args.conv_impl, "--dtype", args.dtype]
    if args.remat:
        cmd.append("--remat")
    return run_json_child(cmd, args.child_timeout, size=size)


def run_json_child(cmd, timeout: float, env=None, **info) -> dict:
    """Runs ``cmd`` and returns the JSON it prints after ``CHILD_TAG`` (plus ``wall_s``), or
    ``info`` with an ``error`` (time-out, or the exit status and the last lines of output)."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(info, error=f"timed out after {timeout:g} s")
    wall = time.perf_counter() - t
    for line in p.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return dict(json.loads(line[len(CHILD_TAG):]), wall_s=wall)
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return dict(info, error=f"exit {p.returncode}: " + " | ".join(tail), wall_s=wall)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    ap.add_argument("--include-160", action="store_true", help="also 160^3 (slow on a CPU)")
    ap.add_argument("--what", default="train,infer,conv,mind,loader")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conv-impl", default="auto", choices=["auto", "native", "depth_sum"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--child-timeout", type=float, default=1200.0,
                    help="seconds allowed to each (size, train|infer) subprocess")
    ap.add_argument("--loader-batches", type=int, default=20)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = set(args.what) - {"train", "infer", "conv", "mind", "loader"}
    if bad:
        ap.error(f"--what: unknown {sorted(bad)}")
    if args.include_160 and 160 not in args.sizes:
        args.sizes = list(args.sizes) + [160]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        fn = {"train": bench_train, "infer": bench_infer}[args.child]
        print(CHILD_TAG + json.dumps(fn(args.sizes[0], args)), flush=True)
        return {}

    env = environment()
    tag = env_line(env)
    mm = matmul_bound()
    rate = mm["flops_per_s"]
    print(f"matmul bound: numpy f32 {mm['n']}^3 best of {mm['tries']}: "
          f"{rate / 1e9:.1f} GFLOP/s ({mm['best_s']:.3f} s) {tag}", flush=True)
    config = dict(conv_impl=args.conv_impl, dtype=args.dtype, remat=args.remat,
                  repeats=args.repeats, sizes=args.sizes, what=args.what)
    results = dict(env=env, config=config, matmul=mm, train=[], infer=[], conv=[], mind=[],
                   loader=[])

    loader_data = None
    tmp = tempfile.TemporaryDirectory(prefix="promptreg_bench_")
    try:
        for size in args.sizes:
            for what, key, unit in (("train", "step_s", "s/step"), ("infer", "pair_s", "s/pair")):
                if what not in args.what:
                    continue
                r = run_child(what, size, args)
                if "error" not in r:
                    r["ratio"] = r[key] / (r["flops"] / rate)
                    run_rss = (f", peak RSS while running {r['run_rss_gib']:.2f} GiB"
                               if r.get("run_rss_gib") is not None else "")
                    plan = (f", XLA temp plan {r['plan_temp_gib']:.2f} GiB"
                            if "plan_temp_gib" in r else "")
                    plan += (f", {r['hlo_instructions']} HLO instructions"
                             if "hlo_instructions" in r else "")
                    print(f"{what} {size}^3: compile {r['compile_s']:.1f} s, {r[key]:.2f} {unit} "
                          f"(median of {args.repeats}), {r['flops'] / 1e12:.3f} TFLOP, ratio to "
                          f"matmul bound {r['ratio']:.2f}, peak RSS {r['rss_gib']:.2f} GiB "
                          f"(with compiling){run_rss}{plan}"
                          + (f", device peak {r['device_peak_gib']:.2f} GiB"
                             if "device_peak_gib" in r else "") + f" {tag}", flush=True)
                else:
                    print(f"{what} {size}^3: not measured ({r['error']}) {tag}", flush=True)
                results[what].append(r)
            if "conv" in args.what:
                r = bench_conv(size, args)
                for c in r["convs"]:
                    print(f"conv {size}^3 {c['label']} ({c['size']}^3, x{c['count']} per forward): "
                          f"native {c['native']['fwd_s'] * 1e3:.0f} / {c['native']['fwd_bwd_s'] * 1e3:.0f}"
                          f" ms, depth_sum {c['depth_sum']['fwd_s'] * 1e3:.0f} / "
                          f"{c['depth_sum']['fwd_bwd_s'] * 1e3:.0f} ms (fwd / fwd+bwd; "
                          f"{c['gflop']:.1f} GFLOP fwd; max rel diff {c['max_rel_diff']:.1e}) {tag}",
                          flush=True)
                results["conv"].append(r)
            if "mind" in args.what:
                r = bench_mind(size, args)
                print(f"mind {size}^3 fwd+bwd: fast {r['fast']['fwd_bwd_s'] * 1e3:.1f} ms, "
                      f"straightforward (full {5}^3 window) {r['straightforward']['fwd_bwd_s'] * 1e3:.1f}"
                      f" ms, speedup x{r['speedup']:.2f} (|d loss| {r['max_abs_loss_diff']:.1e}, "
                      f"|d grad| {r['max_abs_grad_diff']:.1e}) {tag}", flush=True)
                results["mind"].append(r)
            if "loader" in args.what:
                if loader_data is None:
                    loader_data = prepare_loader_data(tmp.name)
                    results["loader_data"] = dict(synthetic_size=48, subjects=4,
                                                  generate_s=loader_data[2])
                r = bench_loader(size, loader_data[0], loader_data[1], args)
                print(f"loader {size}^3: {r['pairs_per_s']:.1f} pairs/s from the cache "
                      f"({r['pairs']} pairs in {r['seconds']:.2f} s, build {r['cache_build_s']:.1f} s, "
                      f"num_workers {r['num_workers']}) {tag}", flush=True)
                results["loader"].append(r)
    finally:
        tmp.cleanup()
    results["main_process_rss_gib"] = process_peak_rss_gib()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()

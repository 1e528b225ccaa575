"""Host memory: hand the heap that XLA freed after compiling back to the operating system.

Compiling the network's training step peaks at 2.5-3.1 GiB on XLA:CPU at 64^3, and glibc's
allocator keeps about 1.7 GiB of that resident after XLA frees it; ``malloc_trim(0)`` returns
1.4 GiB of it (measured with ``benchmarks/compare_reference.py``: peak RSS while stepping 5.03 ->
3.47 GiB at 64^3; inference 1.21 -> 0.87 GiB). A no-op where glibc is absent.

Compiling in another process (:func:`run_measured` + JAX's persistent compilation cache) keeps the
compiler's peak out of the long-running process altogether (``benchmarks/compare_reference.py``'s
``aot`` option).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def release_freed_heap() -> bool:
    """``malloc_trim(0)``: returns freed heap pages to the OS; False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def release_compile_caches() -> bool:
    """Drops JAX's tracing and lowering caches (``jax.clear_caches()``: jaxprs, lowered modules,
    executables held by ``jit`` objects), collects, then :func:`release_freed_heap`.

    For a process that holds its ``Compiled`` executables itself (``jit(f).lower(...).compile()``):
    those stay valid; only a later plain call of the ``jit`` object would trace again.
    """
    import gc
    import jax
    jax.clear_caches()
    gc.collect()
    return release_freed_heap()


# ------------------------------------------------------------------ XLA:CPU's memory scheduler
# XLA:CPU orders a program's operations with a concurrency-optimised scheduler by default: it
# keeps more buffers alive so that independent operations may run side by side. The
# memory-optimised one orders them for a small peak. Measured on this network (buffer plans,
# ``memory_analysis().temp_size_in_bytes``): inference at 160^3 3.67 -> 2.44 GiB, the training
# step at 64^3 2.09 -> 1.52 GiB (peak RSS -0.5 GiB, no slower; the README has the runs).
CPU_SCHEDULER_OPTION = "xla_cpu_scheduler_type"
CPU_MEMORY_SCHEDULER = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
SCHEDULER_ENV = "PROMPTREG_CPU_SCHEDULER"  # "memory" (default) or "default"


def cpu_compiler_options(platform: str | None = None) -> dict:
    """The XLA options this project compiles its inference program and training step with
    (``jax.jit(..., compiler_options=...)``): XLA:CPU's memory-optimised scheduler where the
    program is traced for the CPU (``conv.current_platform``), nothing elsewhere.
    ``$PROMPTREG_CPU_SCHEDULER=default``, or a scheduler chosen in ``$XLA_FLAGS``, leaves XLA's
    own choice.
    """
    from promptreg_jax.conv import current_platform
    choice = os.environ.get(SCHEDULER_ENV, "memory").strip().lower()
    if choice not in ("memory", "default"):
        raise ValueError(f"${SCHEDULER_ENV} must be 'memory' or 'default', got {choice!r}")
    if (choice == "default" or current_platform(platform) != "cpu"
            or CPU_SCHEDULER_OPTION in os.environ.get("XLA_FLAGS", "")):
        return {}
    return {CPU_SCHEDULER_OPTION: CPU_MEMORY_SCHEDULER}


# ------------------------------------------------------------------ compiling in another process
# XLA:CPU's compiler peaks at 2.2-2.5 GiB above the process's baseline on the 64^3 training step
# (measured with an abstract state, nothing else allocated), more than the authors' PyTorch code
# needs for a whole training run (1.7-1.8 GiB). Compiling in a short-lived child process that
# writes JAX's persistent compilation cache, and then loading the executable from that cache,
# keeps those arenas out of the long-running process (and makes later runs skip compiling).

def compilation_cache_settings(cache_dir) -> dict:
    """JAX's settings that cache every executable under ``cache_dir`` (config name -> value)."""
    return {"jax_compilation_cache_dir": str(cache_dir),
            "jax_persistent_cache_min_compile_time_secs": 0.0,
            "jax_persistent_cache_min_entry_size_bytes": -1}


def compilation_cache_env(cache_dir) -> dict:
    """The same settings as environment variables, for a child process (JAX reads them at import)."""
    return {k.upper(): str(v) for k, v in compilation_cache_settings(cache_dir).items()}


def use_compilation_cache(cache_dir) -> None:
    """Makes this process read (and write) JAX's persistent compilation cache in ``cache_dir``.

    Call it before the first compilation: JAX opens its cache once, at the first compile.
    """
    import jax
    for key, value in compilation_cache_settings(cache_dir).items():
        jax.config.update(key, value)


def run_measured(cmd, env=None, timeout=None) -> dict:
    """Runs ``cmd`` to completion: ``{"returncode", "seconds", "peak_rss_gib", "output"}``, where
    the peak RSS is that child's own (``wait4``'s rusage; the child's own child processes
    excluded), and ``returncode`` is None if it was killed after ``timeout`` seconds.

    Call it from a small process: the child's peak also counts the pages it inherited from this
    process before exec (from a 4 GiB parent, a 0.4 GiB child reads 4.1 GiB)."""
    import subprocess
    import threading
    import time
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    killed = threading.Event()

    def kill():
        killed.set()
        proc.kill()
    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    try:
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it: its own rusage, not all children's
    finally:
        if timer:
            timer.cancel()
        proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return dict(returncode=None if killed.is_set() else proc.returncode,
                seconds=time.perf_counter() - t, peak_rss_gib=usage.ru_maxrss / 2 ** 20,
                output=output)


# ------------------------------------------------------------------ what a compiled step needs
# ``model.remat="auto"`` (the configs' default): the trainer compiles the step with the least
# recomputation first and keeps the first one whose buffers fit the device. Recomputation is not
# free anywhere (XLA:CPU, 2026-12-03, both steps compiled in one process and stepped
# alternately: "levels" takes 1.28x the time of "none" at 32^3 and 1.21x at 64^3, for a temp
# plan of 0.86 instead of 1.52 GiB at 64^3), so it is chosen where memory requires it.
REMAT_ORDER = ("none", "levels", "blocks")  # least recomputation first
CPU_BUDGET_FRACTION = 0.8  # of the host's available memory, shared by its local CPU devices
GPU_BUDGET_FRACTION = 0.95  # of XLA's GPU allocator limit: cuDNN's workspaces are not in the plan

_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


class DoesNotFitError(RuntimeError):
    """No recomputation mode makes the training step fit the memory budget."""


def compiled_memory(compiled, platform: str) -> dict:
    """Per-device bytes of a compiled program: ``peak``, ``arguments``, ``outputs``,
    ``aliased``, ``temporaries``. TPU reports its buffer assignment's peak
    (``peak_memory_in_bytes``, the figure to use there); XLA:CPU and XLA:GPU do not (0 or only
    the arguments), so their peak is arguments + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    args, outs = m.argument_size_in_bytes, m.output_size_in_bytes
    alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
    reported = getattr(m, "peak_memory_in_bytes", 0) or 0
    peak = reported if platform == "tpu" and reported else args + outs - alias + temp
    return dict(peak=float(peak), arguments=float(args), outputs=float(outs),
                aliased=float(alias), temporaries=float(temp))


def parse_resource_exhausted(message: str) -> tuple[float | None, float | None]:
    """(needed, available) bytes from an XLA out-of-memory compile error, else Nones."""
    import re

    def grab(pattern):
        m = re.search(pattern, message)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else None
    needed = grab(r"required for [^(]*\(([\d.]+)([KMGT]?)\)")
    if needed is None:
        needed = grab(r"[Uu]sed ([\d.]+)([KMGT]) of ")
    available = grab(r"available [A-Za-z ]*\(([\d.]+)([KMGT]?)\)")
    if available is None:
        available = grab(r"of ([\d.]+)([KMGT]) hbm")
    return needed, available


def host_available_bytes() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` (free + reclaimable), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def device_budget_bytes(device, local_devices: int = 1) -> float | None:
    """The bytes one device's step may plan for: XLA's allocator limit on an accelerator
    (``memory_stats()["bytes_limit"]``; on a GPU ``GPU_BUDGET_FRACTION`` of it), and on the CPU
    ``CPU_BUDGET_FRACTION`` of the host's available memory split over its ``local_devices``
    (the Python process, the loader and the compiler need the rest). None when unknown."""
    platform = device.platform
    if platform == "cpu":
        return CPU_BUDGET_FRACTION * host_available_bytes() / max(int(local_devices), 1)
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement it
        stats = {}
    limit = stats.get("bytes_limit")
    if not limit:
        return None
    return float(limit) * (GPU_BUDGET_FRACTION if platform == "gpu" else 1.0)


def first_fitting(try_mode, modes=REMAT_ORDER):
    """Tries ``modes`` in order, least recomputation first: ``try_mode(mode)`` returns
    ``(fits, needed_bytes, payload)``. Returns ``(mode, payload, tried, fits)`` for the first
    mode that fits, or for the last one tried when none does; ``tried`` holds one
    ``(mode, needed_bytes)`` per mode tried, in order."""
    tried = []
    for mode in modes:
        fits, need, payload = try_mode(mode)
        tried.append((mode, need))
        if fits:
            break
    return mode, payload, tried, fits


def least_recompute(compile_mode, budget: float | None, platform: str,
                    modes=REMAT_ORDER):
    """``(mode, compiled, tried)``: the first of ``modes`` whose program ``compile_mode(mode)``
    fits ``budget`` bytes per device (any fits when ``budget`` is None), that program, and
    ``tried``, one ``(mode, needed_bytes)`` per mode compiled, in order.

    A compile refused with RESOURCE_EXHAUSTED (TPU) counts as not fitting; any other error
    propagates. Raises :class:`DoesNotFitError` (one line, every mode's need) when none fits.
    """
    def try_mode(mode):
        try:
            compiled = compile_mode(mode)
        except Exception as e:  # noqa: BLE001 - XLA raises its own types
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return False, parse_resource_exhausted(str(e))[0], None
        need = compiled_memory(compiled, platform)["peak"]
        return budget is None or need <= budget, need, compiled

    mode, compiled, tried, fits = first_fitting(try_mode, modes)
    if fits:
        return mode, compiled, tried
    needs = ", ".join(f"remat={m}: {fmt_gib(n)}" for m, n in tried)
    # On accelerators the scatter-add feature warp needs less memory (slower; README, "Will it
    # fit an accelerator?": the 256^3 bfloat16 step over 4 v5e chips fits only with it).
    sampler = ("" if platform == "cpu" or os.environ.get("PROMPTREG_SAMPLER") else
               ", $PROMPTREG_SAMPLER=mixed (less memory, a slower backward)")
    raise DoesNotFitError(
        f"the training step does not fit {fmt_gib(budget)} per device ({needs}); use a smaller "
        f"data.image_size, model.dtype='bfloat16', more devices along train.mesh's space axis"
        f"{sampler}, or set train.memory_budget_gib")


def fmt_gib(b) -> str:
    """Bytes as ``"12.72 GiB"`` (``"21.4 MiB"`` under 1 GiB; ``"?"`` when unknown)."""
    if b is None:
        return "?"
    return f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"

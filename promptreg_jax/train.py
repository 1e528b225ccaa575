"""Trains PromptReg: ``python -m promptreg_jax.train --config configs/X.py [--workdir DIR]``.

One flat ``train_and_evaluate(config, workdir)``, read top to bottom: devices and mesh -> data ->
model and optimiser -> sharded state -> jitted step -> restore -> loop (log, NaN check,
checkpoint, validation) -> final evaluation. Parameters replicated over a ``(data, space)`` mesh
(``config.train.mesh``, ``promptreg_jax.sharding``): the global batch sharded along ``data`` and
the volumes' X axis along ``space``; several processes (``jax.distributed``) each feed their slice
of every global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import signal
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from promptreg_jax import checkpoint as ckpt_lib
from promptreg_jax.cli import Interrupted, run_cli
from promptreg_jax import memory
from promptreg_jax.memory import cpu_compiler_options, release_freed_heap
from promptreg_jax import evaluate_lib, losses, optim, sharding
from promptreg_jax import data as data_lib
from promptreg_jax.model import (build_model, model_settings, remat_mode, remat_setting,
                                 resolve_fold, resolve_fold_levels)
from promptreg_jax.multihost import min_over_processes, sync_processes

log = logging.getLogger("promptreg_jax.train")


class TrainingError(RuntimeError):
    """A run cannot continue (non-finite loss, bad configuration); the message says why."""


class _StopSignals:
    """Turns SIGTERM and SIGINT (preemption notices, Ctrl-C) into a flag read between steps.

    Installed only in the main thread; the previous handlers come back on exit. A second signal
    of the same kind while stopping is ignored: the checkpoint being written is finished.
    """

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> int:
        """The signal every process stops for (0 = none): the processes agree on the step."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.signum))
        return int(np.max(flags))


def _optim_differences(meta: dict, config) -> list[str]:
    """The optimiser settings that differ between a checkpoint's config and this one."""
    saved = (meta.get("config") or {}).get("optim")
    if not isinstance(saved, dict):
        return []
    now = json.loads(config.optim.to_json_best_effort())
    return [f"optim.{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def _check_resumable(meta: dict, config, settings: dict, source: str) -> None:
    ckpt_lib.check_compatible(meta, settings, source)
    diffs = _optim_differences(meta, config)
    if diffs:
        raise ckpt_lib.CheckpointError(
            f"checkpoint {source} was written with other optimiser settings ({'; '.join(diffs)}); "
            f"rerun with the checkpoint's settings to resume, or start a new --workdir (with "
            f"--config.init_from={source} to keep the parameters)")


def loss_terms(model, params, batch, weights):
    """The training objective of one batch: ``(total, terms)`` (``losses.registration_objective``)."""
    out = model.apply({"params": params}, batch["moving"], batch["fixed"], batch["task_id"])
    return losses.registration_objective(out, batch["fixed"], weights)


BATCH_KEYS = ("moving", "fixed", "task_id")


def make_train_fns(model, tx, schedule, weights, mesh, image_shape, rng):
    """The sharded state and update step for a ``data`` or ``(data, space)`` mesh.

    Returns ``(init_state, train_step, abstract_state, state_sharding)``: ``init_state(rng)``
    creates the state already replicated over the mesh (``jit`` with ``out_shardings``), and
    ``train_step(state, batch) -> (state, metrics)`` is jitted with the batch sharded as
    ``sharding.batch_shardings(mesh)`` (volumes ``P("data", "space")`` when the mesh has a
    ``space`` axis, else ``P("data")``), the state donated, and every metric a replicated scalar.
    With ``space`` > 1 the step is traced under ``sharding.spatial_mesh``, so the model's feature
    maps stay split along X (``sharding.constrain_spatial``).
    """
    repl = NamedSharding(mesh, P())

    def init_state(rng):
        x = jnp.zeros(image_shape, jnp.float32)
        params = model.init(rng, x, x, jnp.zeros((1,), jnp.int32))["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": rng}

    abstract = jax.eval_shape(init_state, rng)
    state_sharding = jax.tree.map(lambda _: repl, abstract)

    def train_step(state, batch):
        with sharding.spatial_mesh(mesh):
            (_, metrics), grads = jax.value_and_grad(
                lambda p: loss_terms(model, p, batch, weights), has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        metrics["lr"] = schedule(state["step"])
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
               "rng": state["rng"]}
        return new, metrics

    init_state = jax.jit(init_state, out_shardings=state_sharding)
    # On the CPU: XLA's memory-optimised scheduler (64^3: temp plan 2.09 -> 1.52 GiB, peak RSS
    # -0.5 GiB, no slower; memory.cpu_compiler_options and the README's measurements).
    train_step = jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_shardings(mesh)),
                         out_shardings=(state_sharding, repl), donate_argnums=0,
                         compiler_options=cpu_compiler_options() or None)
    return init_state, train_step, abstract, state_sharding


def choose_remat(settings, tx, schedule, weights, mesh, image_shape, rng, batch_spec,
                 budget_bytes=None):
    """``model.remat="auto"``: compiles the training step with the least recomputation first
    (``"none"``, then ``"levels"``, then ``"blocks"``) and keeps the first whose buffers fit
    ``budget_bytes`` per device (default ``memory.device_budget_bytes`` of the mesh's first
    device: the accelerator's allocator limit, or on the CPU a share of the host's available
    memory). Recomputation costs time (XLA:CPU: 1.2-1.3x per step), so it is used only where
    memory needs it.

    With ``model.fold_levels="auto"`` on a folded (TPU) network each mode is also compiled with
    the 1/2 level folded where the full-resolution fold alone does not fit
    (:func:`remat_candidates`).

    Returns a ``RematChoice``: the chosen ``mode`` and ``fold_levels``, ``make_train_fns``'
    result for them (``fns``), the compiled step (``compiled``, called like ``train_step``),
    ``tried`` (``(label, needed bytes)`` per program compiled) and the ``budget`` used. Raises
    ``memory.DoesNotFitError`` when even ``"blocks"`` does not fit.
    """
    device = mesh.devices.flat[0]
    if budget_bytes is None:
        budget_bytes = memory.device_budget_bytes(device, len(mesh.local_devices))
        if budget_bytes is not None:  # every process must compile the same program
            budget_bytes = min_over_processes("remat_budget", budget_bytes)
    fns = {}
    candidates = {label: (mode, fl) for label, mode, fl in
                  remat_candidates(settings, device.platform)}

    def compile_mode(label):
        mode, fl = candidates[label]
        model = build_model(dict(settings, remat=remat_setting(mode), fold_levels=fl))
        fns[label] = make_train_fns(model, tx, schedule, weights, mesh, image_shape, rng)
        _, step, abstract, state_sharding = fns[label]
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract, state_sharding)
        return step.lower(state, batch_spec).compile()

    label, compiled, tried = memory.least_recompute(compile_mode, budget_bytes, device.platform,
                                                    tuple(candidates))
    mode, fl = candidates[label]
    return RematChoice(mode, fns[label], compiled, tried, budget_bytes, fl)


def remat_candidates(settings: dict, platform: str) -> list[tuple[str, str, int]]:
    """``(label, remat mode, fold_levels)`` in the order ``model.remat="auto"`` compiles them:
    least recomputation first (``memory.REMAT_ORDER``; VoxelMorph: none, levels). Where
    ``model.fold_levels`` is ``"auto"`` and the network is folded on ``platform`` (``model.fold``
    resolves to > 0: TPU), each mode comes with 1 folded level, then 2 (label ``"<mode>+fold2"``):
    the 1/2-level fold lowers some programs and raises others (README, "Will it fit an
    accelerator?"), so it is compiled only where the first does not fit. Elsewhere the labels are
    the modes and ``fold_levels`` is the configured one ("auto" -> 1)."""
    if settings.get("name", "promptreg") == "voxelmorph":
        return [(m, m, 1) for m in ("none", "levels")]  # checkpoints every block or none
    fl = settings.get("fold_levels", 1)
    if (str(fl).strip().lower() == "auto"
            and resolve_fold(settings.get("fold", "auto"), platform) > 0):
        return [(m if n == 1 else f"{m}+fold2", m, n) for m in memory.REMAT_ORDER for n in (1, 2)]
    return [(m, m, resolve_fold_levels(fl)) for m in memory.REMAT_ORDER]


class RematChoice(NamedTuple):
    mode: str
    fns: tuple
    compiled: object
    tried: list
    budget: float | None
    fold_levels: int = 1


def _check_config(config):
    size = tuple(int(s) for s in config.data.image_size)
    if len(size) != 3 or any(s % 8 or s <= 0 for s in size):
        raise TrainingError(f"config.data.image_size={size}: each of the 3 sizes must be a "
                            f"positive multiple of 8 (the network has 3 stride-2 levels)")
    mesh_sizes(config)
    if config.optim.schedule_per not in ("step", "epoch"):
        raise TrainingError(f"config.optim.schedule_per={config.optim.schedule_per!r}: use "
                            f"'step' or 'epoch'")


def mesh_sizes(config, num_devices: int | None = None) -> dict:
    """``config.train.mesh`` as ``{"data": D, "space": S}`` for the devices, checked against the
    image size and the global batch; a ``TrainingError`` of one line when they do not agree."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    text = str(config.train.get("mesh", "") or "")
    try:
        sizes = sharding.parse_mesh(text, num_devices)
        global_batch = int(config.train.batch_size) or sizes["data"]
        sharding.check_mesh(sizes, config.data.image_size, global_batch, text)
        if sizes["space"] > 1 and jax.process_count() > 1 \
                and jax.local_device_count() % sizes["space"]:
            raise sharding.MeshError(
                f"config.train.mesh={text!r}: space={sizes['space']} must divide the "
                f"{jax.local_device_count()} devices of each process (one pair is read by one "
                f"process)")
    except sharding.MeshError as e:
        raise TrainingError(str(e)) from None
    return sizes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from ``workdir`` if it holds checkpoints) and evaluates; returns metrics."""
    _check_config(config)
    workdir = pathlib.Path(workdir).absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # One probe file per process: processes sharing the workdir must not remove each
        # other's (that race failed a 2-process run with "No such file or directory").
        probe = workdir / f".write_test.{jax.process_index()}.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise TrainingError(f"workdir {workdir} cannot be written: {e.strerror}") from None
    is_main = jax.process_index() == 0

    # ---------------------------------------------------------------- Devices & mesh
    sizes = mesh_sizes(config)
    mesh = sharding.make_mesh(sizes)
    repl = NamedSharding(mesh, P())
    global_batch = int(config.train.batch_size) or sizes["data"]
    local_batch = global_batch // jax.process_count()

    # ---------------------------------------------------------------- Data
    if is_main:  # one process writes (synthetic data, cache); the others wait, then read
        data_lib.prepare_data(config.data, workdir, progress=True)
    sync_processes("data")
    data = data_lib.build_pipeline(config.data, workdir, batch_size=local_batch,
                                   seed=int(config.seed), process_index=jax.process_index(),
                                   process_count=jax.process_count())
    num_tasks = len(data.train_domains)
    steps_per_epoch = max(int(config.data.pairs_per_domain) * num_tasks // global_batch, 1)
    total_steps = int(config.train.total_steps) or int(config.train.epochs) * steps_per_epoch

    # ---------------------------------------------------------------- Model & optimiser
    settings = model_settings(config, num_tasks)
    schedule = optim.make_schedule(config.optim.lr, total_steps, config.optim.power,
                                   steps_per_epoch, config.optim.schedule_per)
    tx = optim.make_optimizer(schedule, amsgrad=config.optim.amsgrad)
    weights = {k: float(config.loss[k]) for k in ("mind", "smooth", "ort", "ts")}
    shape = (1, *[int(s) for s in config.data.image_size], 1)
    rng = jax.random.PRNGKey(int(config.seed))
    batch_sharding = sharding.batch_shardings(mesh)
    # Each process holds whole pairs (its rows of the data axis, every X slab of them): the
    # global shape names the full X, so each device takes its slab from the process's pairs.
    global_shapes = {"moving": (global_batch, *shape[1:]), "fixed": (global_batch, *shape[1:]),
                     "task_id": (global_batch,)}
    batch_spec = {k: jax.ShapeDtypeStruct(global_shapes[k],
                                          jnp.int32 if k == "task_id" else jnp.float32,
                                          sharding=batch_sharding[k]) for k in BATCH_KEYS}
    compiled_step = None
    if remat_mode(settings["remat"]) == "auto":
        budget = float(config.train.get("memory_budget_gib", 0) or 0) * 2 ** 30 or None
        try:
            choice = choose_remat(settings, tx, schedule, weights, mesh, shape, rng, batch_spec,
                                  budget)
        except memory.DoesNotFitError as e:
            raise TrainingError(f"model.remat='auto': {e}") from None
        settings.update(remat=remat_setting(choice.mode), fold_levels=choice.fold_levels)
        compiled_step = choice.compiled
        if is_main:
            fl = f", fold_levels {choice.fold_levels}" if choice.fold_levels != 1 else ""
            print(f"model.remat='auto' -> {choice.mode!r}{fl} (step per device: " + ", ".join(
                f"{m} {memory.fmt_gib(n)}" for m, n in choice.tried)
                + f"; budget {memory.fmt_gib(choice.budget)})", flush=True)
        init_state, _, abstract, state_sharding = choice.fns
        model = build_model(settings)
        # Processes compile at their own pace; meet before the next collective (gloo's 30 s).
        sync_processes("remat_chosen")
    else:
        model = build_model(settings)
        init_state, train_step, abstract, state_sharding = make_train_fns(
            model, tx, schedule, weights, mesh, shape, rng)

    def to_global(local):
        return {k: jax.make_array_from_process_local_data(batch_sharding[k], np.asarray(local[k]),
                                                          global_shapes[k])
                for k in BATCH_KEYS}

    # ---------------------------------------------------------------- Restore or init
    meta = {"model": settings, "config": json.loads(config.to_json_best_effort()),
            "domains": [d.name for d in data.train_domains], "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "global_batch": global_batch}
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints)
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    if compiled_step is not None:
        train_step = compiled_step
    if jax.process_count() > 1:
        # Compile the step before the first collective and meet there: gloo gives processes
        # 30 s to meet, and compiling this network can take minutes.
        init_state = init_state.lower(rng).compile()
        if compiled_step is None:
            train_step = train_step.lower(abstract_sharded, batch_spec).compile()
        sync_processes("compiled")
    restored = checkpointer.restore(
        abstract_sharded, data.train_iter,
        check=lambda m: _check_resumable(m, config, settings, str(checkpointer.directory))
    ) if checkpointer.all_steps() else None
    if restored is not None:
        state, saved_meta, start = restored
        log.info("resumed from %s at step %d", checkpointer.directory, start)
    else:
        state = init_state(rng)
        if config.init_from:  # fine-tuning: parameters only, fresh optimiser and data order
            params, init_meta, _ = ckpt_lib.load_params(config.init_from)
            ckpt_lib.check_compatible(init_meta, settings, str(config.init_from))
            state["params"] = jax.device_put(params, jax.tree.map(lambda _: repl, params))
            state["opt_state"] = jax.jit(tx.init, out_shardings=state_sharding["opt_state"])(
                state["params"])
            log.info("initialised parameters from %s", config.init_from)
    start = int(jax.device_get(state["step"]))

    # ---------------------------------------------------------------- Logging
    writer = None
    if is_main:
        try:
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # a declared dependency, but training needs none of it
            log.warning("tensorboardX is not installed (pip install tensorboardX): no TensorBoard "
                        "logs; the progress bar and final_metrics.json still report the run")
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    predict = evaluate_lib.predict_fn(model)

    def validate(step, final=False):
        # A host copy of the replicated parameters: every process evaluates on its own first
        # device (the same numbers everywhere; process 0 reports them).
        params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state["params"])
        results = {}
        for domain, items in data.eval_items().items():
            rows = evaluate_lib.evaluate_pairs(lambda m, f: predict(params, m, f),
                                               items, domain.num_classes)
            summary = evaluate_lib.summarize(rows)
            results[domain.name] = summary
            if writer is not None:
                for k in ("dice_mean", "dice_before_mean", "hd95_mean", "neg_jacobian_pct_mean"):
                    if k in summary:
                        writer.add_scalar(f"val/{domain.name}/{k}", summary[k], step)
        if is_main:
            _print_dice_table(results, step, final)
        return results

    # ---------------------------------------------------------------- Train loop
    progress = _progress(is_main, start, total_steps)
    last_metrics, t_last, n_last = {}, time.perf_counter(), start
    step = start
    stop_at = int(config.train.get("stop_at_step", 0)) or total_steps
    saved = checkpointer.all_steps()
    saved_step = saved[-1] if saved else -1
    with _StopSignals() as signals:
        while step < min(total_steps, stop_at):
            signum = signals.requested()
            if signum:  # preemption notice or Ctrl-C: save this step boundary and stop
                progress.close()
                if step > saved_step:
                    checkpointer.save(step, state, meta, data.train_iter)
                checkpointer.close()
                name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
                where = (f"checkpoint of step {step} in {checkpointer.directory}" if step > 0
                         else "nothing to save yet")
                raise Interrupted(signum, f"interrupted by {name} at step {step}: {where}; "
                                          f"rerun the same command to resume")
            batch = to_global(next(data.train_iter))
            state, metrics = train_step(state, batch)
            if step == start:  # compiled by now: return the compiler's freed heap to the OS
                release_freed_heap()
            step += 1
            metrics = jax.device_get(metrics)
            if not all(np.isfinite(float(v)) for v in metrics.values()):
                good = checkpointer.all_steps()
                raise TrainingError(
                    f"non-finite loss at step {step} ({_fmt(metrics)}); stopped without saving. "
                    f"The last good checkpoint is step {good[-1] if good else 'none'} in "
                    f"{checkpointer.directory}: lower config.optim.lr or check the data, then "
                    f"rerun the same command to resume from it")
            last_metrics = {k: float(v) for k, v in metrics.items()}
            progress.update(1)
            if step % config.train.log_every_steps == 0 or step == total_steps:
                now = time.perf_counter()
                last_metrics["steps_per_sec"] = (step - n_last) / max(now - t_last, 1e-9)
                t_last, n_last = now, step
                progress.set_postfix_str(_fmt(last_metrics,
                                              ("loss", "mind", "lr", "steps_per_sec")))
                if writer is not None:
                    for k, v in last_metrics.items():
                        writer.add_scalar(f"train/{k}", v, step)
            if step % config.train.checkpoint_every_steps == 0 or step in (total_steps, stop_at):
                checkpointer.save(step, state, meta, data.train_iter)
                saved_step = step
            if config.train.eval_every_steps and step % config.train.eval_every_steps == 0 \
                    and step != total_steps:
                validate(step)
    progress.close()

    # ---------------------------------------------------------------- Final evaluation
    if step < total_steps:  # stopped early on purpose (stop_at_step): no final evaluation
        checkpointer.close()
        return {"step": step, "train": last_metrics, "eval": {}, "state": state}
    results = validate(step, final=True) if config.train.final_eval else {}
    if is_main:
        (workdir / "final_metrics.json").write_text(json.dumps(
            {"step": step, "train": last_metrics, "eval": results}, indent=2))
    if writer is not None:
        writer.close()
    checkpointer.close()
    return {"step": step, "train": last_metrics, "eval": results, "state": state}


def _fmt(metrics, keys=None):
    keys = keys or sorted(metrics)
    return " ".join(f"{k}={float(metrics[k]):.4g}" for k in keys if k in metrics)


def _print_dice_table(results, step, final):
    title = "final evaluation" if final else f"validation at step {step}"
    print(f"\n{title} (Dice at original resolution, mean over pairs):", flush=True)
    print(f"  {'domain':<14}{'pairs':>6}{'before':>9}{'after':>9}{'HD95':>9}{'%|J|<=0':>9}")
    for name, s in results.items():
        print(f"  {name:<14}{s['pairs']:>6}{s.get('dice_before_mean', math.nan):>9.3f}"
              f"{s.get('dice_mean', math.nan):>9.3f}{s.get('hd95_mean', math.nan):>9.2f}"
              f"{s.get('neg_jacobian_pct_mean', math.nan):>9.3f}", flush=True)


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


class _LineProgress:
    """The progress of a run whose stderr is a file (SLURM, nohup, a TPU VM's log): one line per
    logged step, ``train 200/30000: loss=0.1234 mind=0.1201 lr=9.9e-05 steps_per_sec=2.31``,
    instead of a progress bar's carriage returns."""

    def __init__(self, start, total, file=None):
        self.n, self.total, self.file = start, total, file or sys.stderr

    def update(self, n):
        self.n += n

    def set_postfix_str(self, s):
        print(f"train {self.n}/{self.total}: {s}", file=self.file, flush=True)

    def close(self):
        pass


def _progress(enabled, start, total):
    if not enabled:
        return _NoProgress()
    if not sys.stderr.isatty():
        return _LineProgress(start, total)
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def _parse_flags(argv):
    """absl's flag parsing, with a bad ``--config.*`` override as one line instead of a traceback."""
    from absl import app
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        name = str(e).strip("'\" ")
        bad = [a.split("=")[0] for a in argv[1:]
               if a.startswith("--config.") and name in a.split("=")[0].split(".")]
        what = bad[0] if bad else "a --config.* override"
        print(f"error: {what}: no such config option or invalid value ({name}); the options are "
              f"the keys of the config file (see promptreg_jax/recipes.py)", file=sys.stderr)
        sys.exit(2)


def main(argv):
    from absl import flags
    from ml_collections import config_flags
    del argv
    flags_ = flags.FLAGS
    config_file = config_flags.get_config_filename(flags_["config"]).split(":")[0]
    workdir = flags_.workdir or os.path.join("runs", pathlib.Path(config_file).stem)

    def run():
        if flags_.coordinator_address:  # multi-process run (one process per host or per GPU)
            jax.distributed.initialize(flags_.coordinator_address, flags_.num_processes,
                                       flags_.process_id)
        elif flags_.distributed:  # TPU pods / SLURM: jax discovers the cluster itself
            jax.distributed.initialize()
        train_and_evaluate(flags_.config, workdir)

    return run_cli(run, extra_errors=(TrainingError,), log_level=logging.INFO)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "", "Run folder: checkpoints, logs, metrics. Resumes if it "
                                       "holds checkpoints. Default: runs/<config name>.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (cluster "
                                            "auto-detection) before training.")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a multi-process run.")
    flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=_parse_flags)

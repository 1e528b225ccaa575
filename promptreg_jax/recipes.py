"""Config pieces shared by the files in ``configs/``: the paper's recipe and the real domains.

Each config file builds on ``base_config()`` and changes what its experiment changes, so a
config shows every hyperparameter and where it departs from the paper.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections

# The five domains of the paper, in the authors' task order (SPEC section 5). Roots are folder
# names under config.data.root (or $PROMPTREG_DATA_ROOT), in the authors' CSV layout
# (<root>/<Task>/csv/train.csv, test.csv); set `reader` and `root` per domain for other layouts.
REAL_DOMAINS = (
    dict(name="Abdominal", modality="ct", reader="csv", root="Abdominal", num_classes=5),
    dict(name="Brain", modality="mr", reader="csv", root="Brain", num_classes=36),
    dict(name="Hippocampus", modality="mr", reader="csv", root="Hippocampus", num_classes=3),
    dict(name="Cardiac", modality="mr", reader="csv", root="Cardiac", num_classes=4),
    dict(name="Hip", modality="ct", reader="csv", root="Hip", num_classes=4),
)


def real_domains(held_out: str | None = None) -> list[dict]:
    """The five real domains; ``held_out`` names one to leave out of training (zero-shot)."""
    names = [d["name"].lower() for d in REAL_DOMAINS]
    if held_out is not None and held_out.lower() not in names:
        raise ValueError(f"unknown domain {held_out!r} to hold out; choose one of "
                         f"{[d['name'] for d in REAL_DOMAINS]}")
    return [dict(d, held_out=(held_out is not None and d["name"].lower() == held_out.lower()))
            for d in REAL_DOMAINS]


def base_config() -> ml_collections.ConfigDict:
    """The paper's recipe (SPEC section 0, "paper" column) on the five real data sets."""
    c = ml_collections.ConfigDict()
    c.seed = 42                       # model init and data order

    c.model = ml_collections.ConfigDict()
    c.model.name = "promptreg"        # "promptreg" or "voxelmorph"
    c.model.channels = 16             # c: encoder widths c, 2c, 4c, 8c
    c.model.use_prompt = True         # False: plain RDP (the paper's "w/o RPG")
    c.model.prompt_head = "spatial"   # "spatial" (paper) or "pooled_attention" (authors' code)
    c.model.temperature = 0.1         # softmax temperature tau of the prompt weights
    c.model.schedule = (2, 2, 3, 1)   # flow estimates per level, 1/8 -> full resolution
    c.model.int_steps = 7             # scaling-and-squaring steps per velocity
    c.model.conv_impl = "auto"        # "auto", "native" (cuDNN/TPU) or "depth_sum" (fast on CPU)
    c.model.dtype = "float32"         # compute dtype: "float32" or "bfloat16" (params stay f32)
    c.model.remat = "auto"            # recompute in backward: "auto" (least that fits the device,
    #                                   train.choose_remat), "none", "levels" or "blocks" (least memory)
    c.model.fold = "auto"             # Z-fold of the full-res maps: "auto" (8 on TPU), 0 or 8
    c.model.fold_levels = "auto"      # levels folded: 1 (full res), 2 (also 1/2, by fold / 2) or
    #                                   "auto" (with remat "auto": 2 where 1 does not fit, else 1)

    c.data = ml_collections.ConfigDict()
    c.data.root = ""                  # folder holding the domain folders; "" -> $PROMPTREG_DATA_ROOT
    c.data.domains = real_domains()   # training domains get task ids 0..Z-1 in this order
    c.data.image_size = (160, 160, 160)
    c.data.norm_mode = "paper"        # "paper" or "reference" intensity windows (SPEC section 0)
    c.data.pairs_per_domain = 100     # pairs per domain per epoch, exactly balanced
    c.data.cache_dir = ""             # preprocessed arrays; "" -> <workdir>/cache
    c.data.num_workers = 0            # grain worker processes for reading
    c.data.eval_pairs_per_domain = 8  # validation pairs per domain (test split)
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.enabled = False  # True: generate the offline synthetic domains into root
    c.data.synthetic.size = 48
    c.data.synthetic.subjects = 8
    c.data.synthetic.seed = 0

    c.loss = ml_collections.ConfigDict()
    c.loss.mind = 1.0                 # MIND-SSC (r=2, d=2) similarity
    c.loss.smooth = 0.1               # squared forward differences of the final field
    c.loss.ort = 0.001                # L_ort, orthogonality of the static knowledge base
    c.loss.ts = 0.001                 # L_ts, task similarity (training domains only)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.power = 0.9               # polynomial decay to 0 over the run
    c.optim.schedule_per = "step"     # "step" (paper) or "epoch" (authors' code)
    c.optim.amsgrad = True

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 300
    c.train.batch_size = 0            # global batch; 0 -> one pair per data shard (the paper: 1)
    c.train.mesh = "data=-1,space=1"  # devices = data x space (-1: the rest). data splits the batch,
                                      # space splits each volume's X axis (one pair over several
                                      # chips; X a multiple of 8 x space; with several processes
                                      # space must divide each one's devices)
    c.train.total_steps = 0           # 0 -> epochs * steps per epoch
    c.train.log_every_steps = 50
    c.train.eval_every_steps = 5000   # validation Dice per domain; 0 -> only at the end
    c.train.checkpoint_every_steps = 2000
    c.train.keep_checkpoints = 3
    c.train.final_eval = True         # original-resolution evaluation of every domain at the end
    c.train.stop_at_step = 0          # >0: checkpoint and stop there (preemption drills, tests)
    c.train.memory_budget_gib = 0.0   # model.remat="auto": bytes per device the step may plan for;
    #                                   0 -> the device's (accelerator limit, CPU: 0.8 x available)

    c.init_from = ""                  # workdir or checkpoint to fine-tune from (params only)
    return c


# ------------------------------------------------------------------------------------ variants
def without_prompt(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Table 2 "w/o RPG": plain RDP, no prompt generator (L_ort, L_ts vanish with it)."""
    config.model.use_prompt = False
    return config


def without_constraints(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Table 2 "w/o R. Cons.": the RPG kept, its regularisers L_ort and L_ts weighted 0."""
    config.loss.ort = 0.0
    config.loss.ts = 0.0
    return config


def holding_out(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Leave-one-domain-out: the configured domain ``name`` is evaluated only (zero-shot)."""
    names = [d["name"].lower() for d in config.data.domains]
    if name.lower() not in names:
        raise ValueError(f"unknown domain {name!r} to hold out; choose one of "
                         f"{[d['name'] for d in config.data.domains]}")
    config.data.domains = [dict(d, held_out=d["name"].lower() == name.lower())
                           for d in config.data.domains]
    return config


# ------------------------------------------------------------------------------------ loading
def load_config(spec: str) -> ml_collections.ConfigDict:
    """``configs/X.py`` or ``configs/X.py:arg`` -> the ConfigDict its ``get_config`` returns.

    The one loader for Python callers (evaluate, experiments, tests); the train command reads the
    same files through ``ml_collections.config_flags``, which adds ``--config.KEY=VALUE``.
    """
    path, _, arg = str(spec).partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: file not found")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a broken config file, reported in one line
        raise ValueError(f"--config {path}: cannot load ({type(e).__name__}: {e})")
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path}: defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()

"""Train every plugin trainer for a few steps through nnU-Net's own training code (device check, DDP, benchmarks).

Shared by ``nnunet_plugins.device_check`` (the prepared GPU-node check), ``nnunet_plugins.ddp_cpu`` (DDP on
CPU) and ``benchmarks/run_all.py``. Everything goes through nnU-Net's public machinery, never a trainer's
internals, so any trainer listed in the registry (and any added later) runs here:

* data: ONE synthetic dataset for all trainers: two synthetic sources (2 structures + 1 structure, one unlabeled
  image each) merged by ``nnunet_plugins.multitask.combine`` (the multi-task trainers need its task tables; the
  single-task trainers and nnU-Net's default trainer see an ordinary 4-label nnU-Net dataset), then
  ``nnUNetv2_plan_and_preprocess``, ``semi preprocess`` of the unlabeled images and a labeled-fraction split
  (``splits_semi.json``, half the labels): the unlabeled data of semi-supervised trainers;
* plans: per trainer a copy of nnU-Net's plans with the patch, the batch size and the architecture entry of
  ``CASES`` (``size="official"``: the methods' published patch and widths; ``size="tiny"``: CPU-test sizes,
  narrowed networks through the plans' ``arch_kwargs`` as a user narrows them); the baseline is nnU-Net's
  default ``nnUNetTrainer`` on plans of the SAME patch, batch and data whose architecture is the U-Net that
  nnU-Net's planner builds for that patch (``stock_unet_architecture``);
* training: ``nnunetv2.run.run_training.get_trainer_from_args`` (what ``nnUNetv2_train`` does), then the
  trainer's own ``on_train_start`` / ``train_step`` / ``on_train_end`` on one fixed batch (the loss must
  fall), timing each step; ``on_train_end`` writes ``checkpoint_final.pth`` so the model can be predicted.

nnU-Net reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` when ``nnunetv2.paths`` is first
imported: call ``setup_environment`` before anything imports nnunetv2 (this module imports it lazily).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field

from nnunet_plugins.atomic import write_json

DATASET_ID = 990
DATASET_NAME = "Dataset990_DeviceCheck"
CONFIGURATION = "3d_fullres"
BASELINE_TRAINER = "nnUNetTrainer"

# widths of nnU-Net's default U-Net (32 doubling, capped at 320) and of the narrowed CPU-test U-Net
OFFICIAL_UNET_WIDTH = (32, 320)
TINY_UNET_WIDTH = (8, 32)


@dataclass(frozen=True)
class CheckCase:
    """How one trainer is checked.

    ``official_patch`` / ``tiny_patch``: the patch in each size mode. ``topology_spacing``: the spacing given to
    nnU-Net's pooling rule when it builds the U-Net topology for the patch (None: the plans' spacing);
    BA-Net's published 6-stage 128^3 network is planned for isotropic data. ``network`` and
    ``official_kwargs`` / ``tiny_kwargs``: the plans' architecture entry for trainers that read their network
    from the plans (None: the stock U-Net entry, which the trainer maps to its own network).
    """

    official_patch: tuple = (64, 160, 160)
    tiny_patch: tuple = (16, 32, 32)
    topology_spacing: tuple | None = None
    network: str | None = None
    official_kwargs: dict | None = None
    tiny_kwargs: dict | None = None
    batch_size: int = 2

    def patch(self, size: str) -> tuple:
        return tuple(self.official_patch if size == "official" else self.tiny_patch)

    def architecture_override(self, size: str) -> tuple[str, dict] | None:
        kwargs = self.official_kwargs if size == "official" else self.tiny_kwargs
        if self.network is None or kwargs is None:
            return None
        return self.network, dict(kwargs)


_COTR = "nnunet_plugins.architectures.cotr.CoTr"
_DODNET = "nnunet_plugins.architectures.dodnet.DoDNet"
_TRANSDODNET = "nnunet_plugins.architectures.transdodnet.TransDoDNet"

# Published configurations: CoTr 48x192x192 (official widths: the trainer builds them from stock plans);
# BA-Net 6 stages at 128^3 (KiPA22, isotropic); UniSeg on nnU-Net's U-Net at an nnU-Net-like CT patch;
# DoDNet / TransDoDNet 64x192x192 (MOTS crop). A trainer not listed here is checked on the stock U-Net plans.
CASES: dict[str, CheckCase] = {
    "CoTrTrainer": CheckCase(official_patch=(48, 192, 192), network=_COTR, tiny_kwargs={
        "stage_channels": [8, 24, 48, 48], "blocks_per_stage": [1, 1, 1], "num_heads": 4, "ffn_dim": 96,
        "num_encoder_layers": 1}),
    "BANetTrainer": CheckCase(official_patch=(128, 128, 128), topology_spacing=(1.0, 1.0, 1.0)),
    "BANetTrainer_consistency": CheckCase(official_patch=(128, 128, 128), topology_spacing=(1.0, 1.0, 1.0)),
    "UniSegTrainer": CheckCase(official_patch=(64, 192, 160)),
    "DoDNetTrainer": CheckCase(official_patch=(64, 192, 192), tiny_patch=(16, 32, 32), network=_DODNET,
                               tiny_kwargs={"features_per_stage": [8, 8, 16, 16, 16], "blocks_per_stage": [1] * 5,
                                            "norm_groups": 4, "head_channels": 8}),
    "TransDoDNetTrainer": CheckCase(official_patch=(64, 192, 192), tiny_patch=(16, 32, 32), network=_TRANSDODNET,
                                    tiny_kwargs={"stem_channels": 8, "backbone_planes": [4, 8, 8],
                                                 "backbone_blocks": [1, 1, 1], "d_model": 24, "n_heads": 4,
                                                 "d_ffn": 48, "num_encoder_layers": 1, "num_decoder_layers": 1,
                                                 "n_levels": 2, "n_points": 2, "decoder_channels": [8, 16, 16, 16],
                                                 "head_channels": 8}),
}
DEFAULT_CASE = CheckCase()


def plugin_trainer_names() -> list[str]:
    """Class names of every trainer in the registry that nnUNetv2_train trains by itself, in registry order
    (MedSeqFT's stage trainers need the previous stage's model: ``nnunet-plugins medseqft run`` trains them)."""
    from nnunet_plugins.registry import standalone_trainer_paths

    return [path.rpartition(".")[2] for path in standalone_trainer_paths()]


def case_of(trainer: str) -> CheckCase:
    return CASES.get(trainer, DEFAULT_CASE)


# ---- environment and data -------------------------------------------------------------------------------------
def check_environment(root: str, threads: int = 1) -> dict:
    """The environment for nnU-Net's folders under ``root`` (created): augmentation in the training process
    (``nnUNet_n_proc_DA=0``: one batch is all a check needs), no torch.compile (minutes of compilation for a few
    steps), this package's trainers registered. This process's environment is not changed."""
    from nnunet_plugins.runner import nnunet_cpu_env

    env = nnunet_cpu_env(root, augmentation_workers=0, threads=threads)
    # the multi-task trainers' warm-up is a tenth of the run: a short nominal run keeps it at 0 epochs so the
    # fixed-batch steps train at the method's learning rate (the number of steps is what the caller runs)
    env.setdefault("NNUNET_PLUGINS_EPOCHS", "5")
    return env


def setup_environment(root: str, threads: int = 1) -> dict:
    """``check_environment`` applied to THIS process (before nnunetv2 is imported: it reads its folders then)."""
    env = check_environment(root, threads)
    os.environ.update(env)
    return env


def prepare_dataset(env: dict, shape=(16, 40, 40), cases_per_source: int = 3, log_file: str | None = None) -> str:
    """Write the synthetic sources, combine them and run ``nnUNetv2_plan_and_preprocess`` (skipped when done).

    Returns the preprocessed dataset folder. ``shape`` is each case's size (z, y, x); patches larger than the
    images are padded by nnU-Net's data loader and predictor, so official patch sizes need no large images.
    """
    from nnunet_plugins.multitask.combine import combine_datasets
    from nnunet_plugins.runner import console_command, run_step
    from nnunet_plugins.semi.preprocess import preprocess_unlabeled, unlabeled_preprocessed_folder
    from nnunet_plugins.synthetic import generate_dataset

    pre = os.path.join(env["nnUNet_preprocessed"], DATASET_NAME)
    unlabeled = unlabeled_preprocessed_folder(pre, "nnUNetPlans_" + CONFIGURATION)
    if os.path.isfile(os.path.join(pre, "nnUNetPlans.json")) and \
            os.path.isdir(os.path.join(pre, "nnUNetPlans_" + CONFIGURATION)) and os.path.isdir(unlabeled):
        ensure_semi_split(pre)
        return pre
    raw = env["nnUNet_raw"]
    # one unlabeled image per source (imagesUn, carried into the combined dataset): semi-supervised trainers
    generate_dataset(raw, dataset_id=991, name="CheckA", num_cases=cases_per_source, num_test=1, shape=tuple(shape),
                     num_structures=2, num_channels=1, seed=1, num_unlabeled=1, overwrite=True)
    generate_dataset(raw, dataset_id=992, name="CheckB", num_cases=cases_per_source, num_test=1, shape=tuple(shape),
                     num_structures=1, num_channels=1, seed=2, num_unlabeled=1, overwrite=True)
    combine_datasets([991, 992], DATASET_ID, DATASET_NAME.split("_", 1)[1], raw_root=raw, verbose=False,
                     overwrite=True)
    # nnU-Net 2.8.1's planner crashes with nnUNet_n_proc_DA=0 (torch.set_num_threads(0)): unset for planning
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    log_file = log_file or os.path.join(os.path.dirname(env["nnUNet_raw"]), "prepare_log.txt")
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", CONFIGURATION,
                                                                "-np", "2"], plan_env, log_file, echo=False)
    preprocess_unlabeled(DATASET_ID, configurations=[CONFIGURATION], raw_root=raw,
                         preprocessed_root=env["nnUNet_preprocessed"], progress=False)
    ensure_semi_split(pre)
    return pre


def ensure_semi_split(pre: str) -> None:
    """The labeled-fraction split (half of each fold's training cases keep their labels) that semi-supervised
    trainers need for unlabeled data (``splits_semi.json``; the other trainers never read it)."""
    from nnunet_plugins.semi.split import SEMI_SPLITS_FILE, SPLITS_FILE, default_splits, write_semi_split

    if os.path.isfile(os.path.join(pre, SEMI_SPLITS_FILE)):
        return
    if not os.path.isfile(os.path.join(pre, SPLITS_FILE)):   # nnU-Net's own split of the preprocessed cases
        cases = sorted(f[:-4] for f in os.listdir(os.path.join(pre, "nnUNetPlans_" + CONFIGURATION))
                       if f.endswith(".pkl"))
        write_json(default_splits(cases), os.path.join(pre, SPLITS_FILE))
    write_semi_split(pre, "50%")


# ---- plans ---------------------------------------------------------------------------------------------------
def stock_unet_architecture(base: dict, patch, spacing, width=OFFICIAL_UNET_WIDTH) -> tuple[dict, list]:
    """(architecture entry, patch) of the U-Net that nnU-Net 2.8's default planner builds for ``patch``.

    Topology from nnU-Net's own ``get_pool_and_conv_props`` (feature maps down to 4 voxels), ``width[0]``
    features doubling per stage up to ``width[1]``, two convolutions per stage, everything else (norm,
    nonlinearity, class name) kept from ``base`` (the plans' entry). The patch may be adjusted for divisibility.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernels, fitted, _ = get_pool_and_conv_props(list(spacing), list(patch), 4, 999999)
    n = len(strides)
    arch = json.loads(json.dumps(base))
    arch["arch_kwargs"].update(
        n_stages=n, features_per_stage=[min(width[0] * 2 ** i, width[1]) for i in range(n)],
        kernel_sizes=[list(k) for k in kernels], strides=[list(s) for s in strides],
        n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    return arch, [int(s) for s in fitted]


def write_check_plans(pre: str, trainer: str, size: str) -> tuple[str, str]:
    """Write the plans of ``trainer`` and of its baseline in ``size`` mode; return (plans name, baseline plans name).

    Both share data, patch and batch size. When the trainer's case has no architecture override, the two
    names are the same file (the trainer builds its network from nnU-Net's U-Net entry).
    """
    case = case_of(trainer)
    plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
    cfg = plans["configurations"][CONFIGURATION]
    spacing = case.topology_spacing or cfg["spacing"]
    width = OFFICIAL_UNET_WIDTH if size == "official" else TINY_UNET_WIDTH
    unet, patch = stock_unet_architecture(cfg["architecture"], case.patch(size), spacing, width)
    tag = f"{size}_{'x'.join(map(str, patch))}" + ("_iso" if case.topology_spacing else "")

    def write(name, architecture):
        p = json.loads(json.dumps(plans))
        p["plans_name"] = name
        c = p["configurations"][CONFIGURATION]
        c.update(patch_size=patch, batch_size=case.batch_size, architecture=architecture)
        p["configurations"] = {CONFIGURATION: c}
        write_json(p, os.path.join(pre, name + ".json"))
        return name

    baseline = write(f"nnUNetPlans_check_{tag}", unet)
    override = case.architecture_override(size)
    if override is None:
        return baseline, baseline
    network, kwargs = override
    short = network.rpartition(".")[2]
    return write(f"nnUNetPlans_check_{tag}_{short}", {"network_class_name": network, "arch_kwargs": kwargs,
                                                      "_kw_requires_import": []}), baseline


# ---- training ------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class StepResult:
    trainer: str
    plans: str
    patch: list
    batch_size: int
    parameters: int
    losses: list = field(default_factory=list)
    step_times_s: list = field(default_factory=list)
    peak_memory_bytes: int | None = None
    model_folder: str = ""

    @property
    def median_step_s(self) -> float:
        timed = self.step_times_s[1:] or self.step_times_s   # the first step pays cuDNN autotuning / allocation
        return statistics.median(timed)

    @property
    def loss_decreased(self) -> bool:
        import math

        return all(math.isfinite(v) for v in self.losses) and len(self.losses) > 1 and \
            min(self.losses[-2:]) < self.losses[0]

    def to_dict(self) -> dict:
        return {"trainer": self.trainer, "plans": self.plans, "patch": list(self.patch), "batch_size": self.batch_size,
                "parameters": self.parameters, "losses": [float(v) for v in self.losses],
                "step_times_s": [float(v) for v in self.step_times_s], "median_step_s": self.median_step_s,
                "peak_memory_bytes": self.peak_memory_bytes, "loss_decreased": self.loss_decreased,
                "model_folder": self.model_folder}


def make_trainer(trainer: str, plans_name: str, device: str, continue_training: bool = False):
    """The trainer object exactly as ``nnUNetv2_train DATASET 3d_fullres 0 -tr TRAINER -p PLANS`` makes it."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    return get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 0, trainer, plans_name, continue_training,
                                 device=torch.device(device))


def train_fixed_batch(trainer: str, plans_name: str, device: str, steps: int = 6) -> StepResult:
    """``steps`` training steps of ``trainer`` on ONE batch of its own data loader (timed), then its
    ``on_train_end`` (writes ``checkpoint_final.pth``). Peak CUDA memory covers the steps."""
    import torch

    tr = make_trainer(trainer, plans_name, device)
    tr.on_train_start()
    tr.on_train_epoch_start()
    batch = next(tr.dataloader_train)
    result = StepResult(trainer=trainer, plans=plans_name, patch=list(tr.configuration_manager.patch_size),
                        batch_size=int(tr.batch_size),
                        parameters=int(sum(p.numel() for p in tr.network.parameters())),
                        model_folder=tr.output_folder_base)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        out = tr.train_step(batch)
        _sync(device)
        result.step_times_s.append(time.perf_counter() - t0)
        result.losses.append(float(out["loss"]))
    if cuda:
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated())
    # on_train_end stores epoch current_epoch - 1: this run is epoch 0 of the model folder
    tr.current_epoch = 1
    tr.on_train_end()
    del tr, batch
    if cuda:
        torch.cuda.empty_cache()
    return result


def preprocessed_case(pre: str, plans_name: str):
    """(identifier, data tensor) of the first preprocessed training case of ``plans_name``'s configuration."""
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.load(open(os.path.join(pre, plans_name + ".json")))
    folder = os.path.join(pre, PlansManager(plans).get_configuration(CONFIGURATION).data_identifier)
    dataset_class = infer_dataset_class(folder)
    key = sorted(dataset_class.get_identifiers(folder))[0]
    data = dataset_class(folder, [key]).load_case(key)[0]
    return key, torch.from_numpy(data[:]).float()


def time_sliding_window(model_folder: str, data, device: str, repeats: int = 2, tta: bool = True) -> float:
    """Median seconds of nnU-Net's sliding-window prediction of ``data`` with the model in ``model_folder`` (fold 0).

    Plain trainers use ``nnUNetPredictor`` (what ``nnUNetv2_predict`` runs); multi-task trainers use this
    package's ``MultiTaskPredictor`` (``predict-multitask``) on their first task.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_name = os.path.basename(model_folder).split("__")[0]
    multitask = hasattr(recursive_find_trainer_class_by_name(trainer_name), "task_output_channels")
    if multitask:
        from nnunet_plugins.multitask.prediction import MultiTaskPredictor as predictor_class
    else:
        predictor_class = nnUNetPredictor
    predictor = predictor_class(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=True, device=torch.device(device), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, (0,))
    if multitask:
        predictor.set_task(0)
    times = []
    for _ in range(repeats + 1):   # the first call is the warm-up
        _sync(device)
        t0 = time.perf_counter()
        predictor.predict_sliding_window_return_logits(data)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# ---- the suite: every trainer against nnU-Net's default trainer at the same plans -----------------------------
def compare_trainers(pre: str, device: str, size: str, steps: int, trainers=None, *, sliding_window: bool = False,
                     tta: bool = True, deadline: float | None = None, log=print) -> list[dict]:
    """Train each trainer (default: every registry trainer) and nnU-Net's default trainer at the same plans.

    Returns one row per trainer: its ``StepResult`` fields, ``baseline`` (the default trainer's, measured once
    per plans in this process), ``step_ratio`` (median step / baseline's), ``memory_ratio`` on CUDA, ``ok``
    (finite, decreasing loss) and ``error`` (a failure's message; the suite goes on with the next trainer).
    With ``sliding_window`` the rows also hold nnU-Net's sliding-window prediction time of both models on one
    preprocessed case and its ratio. Trainers left when ``deadline`` (time.time()) has passed are returned
    with ``skipped``.
    """
    import traceback

    trainers = list(trainers or plugin_trainer_names())
    baselines: dict = {}
    rows = []
    for name in trainers:
        if deadline is not None and time.time() > deadline:
            rows.append({"trainer": name, "ok": False, "skipped": "time budget used up"})
            log(f"{name}: skipped (time budget used up)")
            continue
        row = {"trainer": name}
        try:
            plans_name, baseline_plans = write_check_plans(pre, name, size)
            result = train_fixed_batch(name, plans_name, device, steps)
            row.update(result.to_dict())
            if baseline_plans not in baselines:
                baselines[baseline_plans] = train_fixed_batch(BASELINE_TRAINER, baseline_plans, device, steps).to_dict()
            base = baselines[baseline_plans]
            row["baseline"] = {k: base[k] for k in ("trainer", "plans", "patch", "parameters", "median_step_s",
                                                    "peak_memory_bytes", "loss_decreased", "model_folder")}
            row["step_ratio"] = row["median_step_s"] / base["median_step_s"]
            if row["peak_memory_bytes"] and base["peak_memory_bytes"]:
                row["memory_ratio"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
            if sliding_window:
                _, data = preprocessed_case(pre, plans_name)
                row["sliding_window_s"] = time_sliding_window(row["model_folder"], data, device, tta=tta)
                if "sliding_window_s" not in base:
                    base["sliding_window_s"] = time_sliding_window(base["model_folder"], data, device, tta=tta)
                row["baseline"]["sliding_window_s"] = base["sliding_window_s"]
                row["predict_ratio"] = row["sliding_window_s"] / base["sliding_window_s"]
            row["ok"] = bool(row["loss_decreased"])
            log(f"{name}: step {row['median_step_s'] * 1e3:.1f} ms ({row['step_ratio']:.2f}x nnUNetTrainer), "
                f"loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}" + ("" if row["ok"] else "  FAILED"))
        except Exception as e:  # one broken trainer must not hide the results of the others
            row.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0],
                       traceback=traceback.format_exc())
            log(f"{name}: ERROR {row['error']}")
        rows.append(row)
    return rows

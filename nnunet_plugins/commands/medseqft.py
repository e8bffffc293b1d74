"""``nnunet-plugins medseqft``: MedSeqFT sequential fine-tuning (pretrain, run a sequence, predict any task).

Workflow (see :mod:`nnunet_plugins.training.medseqft` for the method and :mod:`nnunet_plugins.trainers.medseqft`
for the trainers)::

    nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres                   # M_0's plans come from here
    nnunet-plugins medseqft pretrain -d 501 502 -c 3d_fullres            # M_0: masked-volume pre-training
    nnunet-plugins medseqft run --init $nnUNet_results/Dataset501_X/MedSeqFTPretrainer__MedSeqFTPlans__3d_fullres/fold_all/checkpoint_final.pth \\
        --sequence 503 504 505 -c 3d_fullres
    nnUNetv2_predict -i IN -o OUT -d 505 -c 3d_fullres -f 0 -tr MedSeqFTTrainer -p MedSeqFTPlans   # task of stage 3
    nnunet-plugins medseqft predict -i IN -o OUT -d 505 --task 503 -c 3d_fullres -f 0               # task 1 with M_3

* Plans: every dataset is preprocessed with M_0's plans (one architecture across the sequence), written as
  ``$nnUNet_preprocessed/DatasetXXX/<--plans-name>.json`` (default ``MedSeqFTPlans``) with the dataset's own
  name, data identifier and image reader (as ``nnUNetv2_move_plans_between_datasets``); fingerprints are
  extracted when missing; complete preprocessed folders are kept.
* ``pretrain``: M_0's plans are the first dataset's ``-p`` plans; the U-Net of those plans plus a
  reconstruction head is trained with the masked-reconstruction objective on the training images of all given
  datasets (labels unused). Result: a model folder ``MedSeqFTPretrainer__<plans>__<c>/fold_all`` whose
  ``checkpoint_final.pth`` is an ordinary nnU-Net checkpoint of the U-Net plus the head (``medseqft_head``).
* ``run``: ``--init`` is any nnU-Net checkpoint of a U-Net (the pretrain result, a default nnU-Net model, a UniSeg
  backbone made with ``uniseg-backbone``); ``plans.json`` and ``dataset.json`` of its model folder give M_0's
  plans. A checkpoint without reconstruction head gets one, trained briefly on the frozen network
  (``--head-iterations``; kept as ``medseqft_m0_reconstruction.pth`` in stage 1's model folder). Stage t leaves
  ``$nnUNet_results/<D_t>/MedSeqFTTrainer__<plans>__<c>/fold_F/`` (``checkpoint_final.pth`` = M_t, the
  validation, ``medseqft_buffer.json`` = B_t, ``medseqft_stage.json`` = the record that makes the stage
  finished) and the teacher's folder ``MedSeqFTTeacherTrainer__...``. A rerun skips finished stages (a record
  of another sequence, init or options is an error naming the folder), continues an interrupted stage from its
  buffer / teacher / ``checkpoint_latest.pth`` (``--c`` semantics), and checks everything (datasets exist, channel
  counts equal M_0's, the checkpoint exists and fits the plans) before any training. ``--plain``: the baseline,
  plain sequential fine-tuning (``SequentialFTTrainer`` folders, no buffers).
* ``predict``: nnU-Net's predictor on the model of stage ``-d`` for the task of an earlier stage (``--task``;
  default the stage's own); the task's preprocessing comes from that stage's model folder.
"""
from __future__ import annotations

import copy
import json
import os

PLANS_NAME = "MedSeqFTPlans"
STAGE_RECORD = "medseqft_stage.json"
BUFFER_FILE = "medseqft_buffer.json"
M0_HEAD_FILE = "medseqft_m0_reconstruction.pth"
PRETRAINER = "MedSeqFTPretrainer"


# ---- argument parsing ---------------------------------------------------------------------------------------
def _common(p, fold_default="0") -> None:
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("--plans-name", default=PLANS_NAME,
                   help=f"plans identifier M_0's plans are written under in every dataset (default {PLANS_NAME})")
    p.add_argument("-device", "--device", default=None, choices=("cpu", "cuda", "mps"),
                   help="device (default cuda when available, else cpu)")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing processes (default 2)")


def _options(p) -> None:
    from nnunet_plugins.training.distillation import KD_TYPES
    from nnunet_plugins.training.medseqft import MedSeqFTOptions

    d = MedSeqFTOptions()
    p.add_argument("-k", "--k", type=int, default=d.k, help=f"MDS buffer size K per stage (default {d.k})")
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"MDS masks per case R (default {d.repeats})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha (default: = rank)")
    p.add_argument("--lam", type=float, default=d.lam, help=f"weight of KD to the teacher (default {d.lam})")
    p.add_argument("--mu", type=float, default=d.mu, help=f"weight of KD to M_(t-1) on the buffers (default {d.mu})")
    p.add_argument("--kd", default=d.kd, choices=KD_TYPES, help=f"distillation term (default {d.kd})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"KL temperature (default {d.temperature})")
    p.add_argument("--mask-ratio", type=float, default=d.mask_ratio, help=f"masked fraction (default {d.mask_ratio})")
    p.add_argument("--cube-size", type=int, default=d.cube_size, help=f"mask cube edge in voxels (default {d.cube_size})")
    p.add_argument("--fill", default=d.fill, choices=("zero", "noise"), help=f"masked voxels (default {d.fill})")
    p.add_argument("--recon-loss", default=d.recon_loss, choices=("mse", "l1"), help=f"default {d.recon_loss}")
    p.add_argument("--mds-patches", default=d.mds_patches, choices=("centre", "sliding"),
                   help=f"patches MDS scores per case (default {d.mds_patches})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"MDS / reconstruction seed (default {d.seed})")


def _run_length(p) -> None:
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of each training phase (default: NNUNET_PLUGINS_EPOCHS or nnU-Net's 1000)")
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations per epoch (default: NNUNET_PLUGINS_ITERS or nnU-Net's 250)")
    p.add_argument("--val-iterations", type=int, default=None,
                   help="validation iterations per epoch (default: NNUNET_PLUGINS_VAL_ITERS or nnU-Net's 50)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("medseqft", help="MedSeqFT: sequential fine-tuning over a stream of datasets",
                              description="MedSeqFT (Ye, Wu, Luo et al. 2025): pre-train M_0, fine-tune it over a "
                                          "sequence of datasets with MDS buffers and LoRA distillation, predict any "
                                          "task seen.")
    sub = p.add_subparsers(dest="medseqft_command", metavar="SUBCOMMAND")
    sub.required = True

    pre = sub.add_parser("pretrain", help="masked-volume pre-training of M_0 on the images of datasets",
                         description="Pre-train the U-Net of the first dataset's plans with a reconstruction head on "
                                     "the training images of all given datasets (labels unused).")
    pre.add_argument("-d", "--datasets", nargs="+", required=True, help="dataset IDs or names")
    pre.add_argument("-p", "--plans", default="nnUNetPlans", help="plans of the first dataset (default nnUNetPlans)")
    pre.add_argument("--iterations", type=int, default=1000, help="training steps (default 1000)")
    pre.add_argument("--batch-size", type=int, default=None, help="default: the plans' batch size")
    pre.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    _common(pre)
    _options(pre)
    pre.set_defaults(func=run_pretrain)

    run = sub.add_parser("run", help="run a sequence of stages (each leaves an nnU-Net model folder)",
                         description="Sequential fine-tuning of M_0 (--init) over the datasets of --sequence; see "
                                     "the module docstring of nnunet_plugins.commands.medseqft.")
    run.add_argument("--init", required=True, help="M_0: an nnU-Net checkpoint (fold_X/checkpoint_final.pth)")
    run.add_argument("--sequence", nargs="+", required=True, help="dataset IDs or names, in order")
    run.add_argument("-f", "--fold", default="0", help="fold of every stage (default 0; 'all')")
    run.add_argument("--plain", action="store_true", help="baseline: plain sequential fine-tuning")
    run.add_argument("--head-iterations", type=int, default=250,
                     help="steps of head-only training when --init has no reconstruction head (default 250)")
    run.add_argument("--no-val", action="store_true", help="skip nnU-Net's final validation of each stage")
    _common(run)
    _options(run)
    _run_length(run)
    run.set_defaults(func=run_sequence_command)

    pr = sub.add_parser("predict", help="predict a task seen by a stage's model",
                        description="nnU-Net's sliding-window prediction with the model of stage -d for the task "
                                    "of an earlier stage (--task).")
    pr.add_argument("-i", "--input", required=True)
    pr.add_argument("-o", "--output", required=True)
    pr.add_argument("-d", "--dataset", required=True, help="dataset of the stage whose model predicts")
    pr.add_argument("--task", default=None, help="dataset of the task to predict (default: the stage's own)")
    pr.add_argument("-f", "--fold", default="0")
    pr.add_argument("-tr", "--trainer", default="MedSeqFTTrainer",
                    choices=("MedSeqFTTrainer", "SequentialFTTrainer"))
    pr.add_argument("--disable-tta", action="store_true")
    _common(pr)
    pr.set_defaults(func=run_predict)


def options_from_args(args):
    from nnunet_plugins.training.medseqft import MedSeqFTOptions

    return MedSeqFTOptions(k=args.k, repeats=args.repeats, rank=args.rank, lora_alpha=args.lora_alpha, lam=args.lam,
                           mu=args.mu, kd=args.kd, temperature=args.temperature, mask_ratio=args.mask_ratio,
                           cube_size=args.cube_size, fill=args.fill, recon_loss=args.recon_loss,
                           mds_patches=args.mds_patches, seed=args.seed)


# ---- datasets and plans -------------------------------------------------------------------------------------
def _paths():
    from nnunetv2 import paths

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not getattr(paths, name):
            raise ValueError(f"{name} is not set")
    return paths


def _device(name):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def dataset_name(dataset) -> str:
    """``DatasetXXX_Name`` of a raw dataset given by ID or name; clear error when there is none."""
    from nnunet_plugins.multitask.combine import resolve_dataset_folder

    raw = _paths().nnUNet_raw
    try:
        folder = resolve_dataset_folder(raw, dataset)
    except FileNotFoundError as e:
        raise ValueError(f"unknown dataset {dataset}: {e}") from None
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        raise ValueError(f"unknown dataset {dataset}: {folder} has no dataset.json")
    return os.path.basename(folder)


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        return json.load(f)


def raw_dataset_json(name: str) -> dict:
    return _load_json(os.path.join(_paths().nnUNet_raw, name, "dataset.json"))


def check_channels(names, m0_dataset_json: dict, init: str) -> None:
    want = len(m0_dataset_json["channel_names"])
    for name in names:
        have = len(raw_dataset_json(name)["channel_names"])
        if have != want:
            raise ValueError(f"dataset {name} has {have} input channel(s), M_0 ({init}) was trained on {want}")


def dataset_plans(name: str, m0_plans: dict, plans_name: str) -> dict:
    """M_0's plans for dataset ``name`` (as nnUNetv2_move_plans_between_datasets makes them)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    plans = copy.deepcopy(m0_plans)
    plans.pop("medseqft", None)
    plans["dataset_name"], plans["plans_name"] = name, plans_name
    for c, conf in plans["configurations"].items():
        if "data_identifier" in conf:
            conf["data_identifier"] = f"{plans_name}_{c}"
    raw_folder = os.path.join(_paths().nnUNet_raw, name)
    ds_json = raw_dataset_json(name)
    cases = get_filenames_of_train_images_and_targets(raw_folder, ds_json)
    if not cases:
        raise ValueError(f"dataset {name} has no training case in {raw_folder}")
    example = next(iter(cases.values()))["images"][0]
    plans["image_reader_writer"] = determine_reader_writer_from_dataset_json(
        ds_json, example, allow_nonmatching_filename=True, verbose=False).__name__
    return plans


def prepare_dataset(name: str, m0_plans: dict, plans_name: str, configuration: str, num_processes: int) -> str:
    """Write M_0's plans into the dataset's preprocessed folder and preprocess it (kept when complete).
    Returns the preprocessed data folder."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_plugins.atomic import write_json

    paths = _paths()
    plans = dataset_plans(name, m0_plans, plans_name)
    base = os.path.join(paths.nnUNet_preprocessed, name)
    os.makedirs(base, exist_ok=True)
    plans_file = os.path.join(base, plans_name + ".json")
    if os.path.isfile(plans_file):
        if _load_json(plans_file) != plans:
            raise ValueError(f"{plans_file} exists with other plans (another M_0?); choose another --plans-name")
    else:
        write_json(plans, plans_file)
    dataset_id = int(name[len("Dataset"):len("Dataset") + 3])
    if not os.path.isfile(os.path.join(base, "dataset_fingerprint.json")):
        extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=False,
                                    clean=False, verbose=False, show_progress_bar=False)
    if not os.path.isfile(os.path.join(base, "dataset.json")):
        write_json(raw_dataset_json(name), os.path.join(base, "dataset.json"))
    data = os.path.join(base, plans["configurations"][configuration]["data_identifier"])
    expected = set(get_filenames_of_train_images_and_targets(os.path.join(paths.nnUNet_raw, name),
                                                              raw_dataset_json(name)))
    have = set(infer_dataset_class(data).get_identifiers(data)) if os.path.isdir(data) and os.listdir(data) else set()
    if not expected <= have:
        preprocess_dataset(dataset_id, plans_name, [configuration], [num_processes], verbose=False,
                           show_progress_bar=False)
    return data


# ---- M_0 ----------------------------------------------------------------------------------------------------
class InitModel:
    """M_0: an nnU-Net checkpoint of a U-Net and its model folder's plans and dataset.json."""

    def __init__(self, checkpoint: str, configuration: str):
        import torch

        from nnunet_plugins.trainers.medseqft import load_weights

        self.checkpoint = os.path.abspath(checkpoint)
        if not os.path.isfile(self.checkpoint):
            raise FileNotFoundError(f"--init checkpoint {checkpoint} does not exist")
        folder = os.path.dirname(os.path.dirname(self.checkpoint))
        self.plans = _load_json(os.path.join(folder, "plans.json"))
        self.dataset_json = _load_json(os.path.join(folder, "dataset.json"))
        if configuration not in self.plans["configurations"]:
            raise ValueError(f"M_0's plans ({folder}/plans.json) have no configuration {configuration!r}")
        self.configuration = configuration
        self.weights = load_weights(self.checkpoint)
        ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        self.head = ckpt.get("medseqft_head")

    def unet(self):
        """The plans' U-Net with M_0's weights (deep supervision off); error when they do not fit."""
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        pm = PlansManager(self.plans)
        cm = pm.get_configuration(self.configuration)
        nin = determine_num_input_channels(pm, cm, self.dataset_json)
        state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in self.weights.items()}
        classes = [v.shape[0] for k, v in state.items() if k.startswith("decoder.seg_layers.") and k.endswith("weight")]
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, nin,
                                     classes[0] if classes else pm.get_label_manager(self.dataset_json)
                                     .num_segmentation_heads, allow_init=True, deep_supervision=False)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"--init {self.checkpoint} does not hold the U-Net of its plans "
                             f"({cm.network_arch_class_name}): {str(e).splitlines()[0]} ...") from None
        return net, cm

    def reconstruction_network(self):
        from nnunet_plugins.training.masked_reconstruction import ReconstructionNetwork

        net, cm = self.unet()
        model = ReconstructionNetwork(net)
        if self.head is not None:
            model.head.load_state_dict(self.head)
        return model, cm


def _label_manager(plans: dict, dataset_json: dict):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(plans).get_label_manager(dataset_json)


# ---- pretrain -----------------------------------------------------------------------------------------------
def run_pretrain(args) -> int:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_plugins.atomic import torch_save, write_json
    from nnunet_plugins.trainers.medseqft import patch_loader, train_reconstruction
    from nnunet_plugins.training.masked_reconstruction import ReconstructionNetwork

    paths = _paths()
    opts = options_from_args(args)
    names = [dataset_name(d) for d in args.datasets]
    first_plans_file = os.path.join(paths.nnUNet_preprocessed, names[0], args.plans + ".json")
    if not os.path.isfile(first_plans_file):
        raise FileNotFoundError(f"{first_plans_file} does not exist: run nnUNetv2_plan_and_preprocess -d "
                                f"{names[0]} (or nnUNetv2_plan_experiment) first")
    m0_plans = dataset_plans(names[0], _load_json(first_plans_file), args.plans_name)
    if args.configuration not in m0_plans["configurations"]:
        raise ValueError(f"{first_plans_file} has no configuration {args.configuration!r}")
    first_json = raw_dataset_json(names[0])
    check_channels(names, first_json, first_plans_file)
    folders = [prepare_dataset(n, m0_plans, args.plans_name, args.configuration, args.num_processes) for n in names]

    out = os.path.join(paths.nnUNet_results, names[0], f"{PRETRAINER}__{args.plans_name}__{args.configuration}",
                       "fold_all")
    final = os.path.join(out, "checkpoint_final.pth")
    if os.path.isfile(final):
        print(f"pre-training finished: {final}")
        return 0
    os.makedirs(out, exist_ok=True)
    pm = PlansManager(m0_plans)
    cm = pm.get_configuration(args.configuration)
    lm = pm.get_label_manager(first_json)
    nin = determine_num_input_channels(pm, cm, first_json)
    torch.manual_seed(opts.seed)
    unet = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, nin, lm.num_segmentation_heads,
                                  allow_init=True, deep_supervision=False)
    model = ReconstructionNetwork(unet)
    batch = args.batch_size or cm.batch_size
    sources = [patch_loader(f, None, batch, cm.patch_size, lm) for f in folders]
    losses = train_reconstruction(model, sources, opts.objective(), args.iterations, model.parameters(),
                                  os.path.join(out, "reconstruction_latest.pth"), lr=args.lr,
                                  device=_device(args.device), seed=opts.seed)
    base = os.path.dirname(out)
    write_json(m0_plans, os.path.join(base, "plans.json"))
    write_json(first_json, os.path.join(base, "dataset.json"))
    fingerprint = os.path.join(paths.nnUNet_preprocessed, names[0], "dataset_fingerprint.json")
    write_json(_load_json(fingerprint), os.path.join(base, "dataset_fingerprint.json"))
    unet = model.network.cpu()
    checkpoint = {
        "network_weights": unet.state_dict(), "medseqft_head": model.head.cpu().state_dict(),
        "medseqft_pretrain": {"datasets": names, "iterations": args.iterations, "options": opts.to_dict(),
                              "losses": losses},
        "trainer_name": "nnUNetTrainer", "current_epoch": 0, "optimizer_state": None, "grad_scaler_state": None,
        "init_args": {"plans": m0_plans, "configuration": args.configuration, "fold": "all",
                      "dataset_json": first_json},
        "inference_allowed_mirroring_axes": tuple(range(len(cm.patch_size))),
    }
    torch_save(checkpoint, final)
    os.remove(os.path.join(out, "reconstruction_latest.pth"))
    print(f"M_0: {final} (reconstruction loss {sum(losses[:10]) / max(1, len(losses[:10])):.4f} -> "
          f"{sum(losses[-10:]) / max(1, len(losses[-10:])):.4f})")
    return 0


# ---- run ----------------------------------------------------------------------------------------------------
def _fold(value):
    return value if value == "all" else int(value)


def stage_folder(name: str, trainer: str, plans_name: str, configuration: str, fold) -> str:
    return os.path.join(_paths().nnUNet_results, name, f"{trainer}__{plans_name}__{configuration}", f"fold_{fold}")


def _make_trainer(cls, name: str, plans_name: str, configuration: str, fold, device, args):
    paths = _paths()
    plans = _load_json(os.path.join(paths.nnUNet_preprocessed, name, plans_name + ".json"))
    ds_json = _load_json(os.path.join(paths.nnUNet_preprocessed, name, "dataset.json"))
    # nnU-Net 2.8.1 takes --c through the plans (its logger continues the previous log)
    out = stage_folder(name, cls.__name__, plans_name, configuration, fold)
    plans["continue_training"] = os.path.isfile(os.path.join(out, "checkpoint_latest.pth"))
    trainer = cls(plans=plans, configuration=configuration, fold=fold, dataset_json=ds_json, device=device)
    for attribute, value in (("num_epochs", args.epochs), ("num_iterations_per_epoch", args.iterations),
                             ("num_val_iterations_per_epoch", args.val_iterations)):
        if value is not None:
            setattr(trainer, attribute, int(value))
    return trainer


def train_phase(trainer) -> str:
    """Train (or continue, or skip when finished) one phase; returns its checkpoint_final.pth."""
    final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    if os.path.isfile(final):
        print(f"  {type(trainer).__name__}: finished ({final})")
        return final
    trainer.initialize()
    latest = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    if os.path.isfile(latest):
        print(f"  {type(trainer).__name__}: continuing from {latest}")
        trainer.load_checkpoint(latest)
    trainer.run_training()
    return final


class _Clock:
    """Wall time of a phase and peak memory of a stage: CUDA peak allocation since the stage began, else the
    process's peak resident set so far (Linux ru_maxrss)."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def start(self):
        import time

        self.t0 = time.perf_counter()

    def stop(self) -> float:
        import time

        return round(time.perf_counter() - self.t0, 2)

    def peak_mib(self) -> float:
        import resource

        import torch

        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _validate(trainer, final: str) -> float | None:
    from nnunet_plugins.trainers.base import PluginTrainer
    from nnunet_plugins.trainers.medseqft import load_weights

    if not trainer.was_initialized:     # trained by an earlier, interrupted run: the plain merged network
        PluginTrainer.initialize(trainer)
        trainer.network.load_state_dict(load_weights(final))
    trainer.perform_actual_validation(False)
    summary = os.path.join(trainer.output_folder, "validation", "summary.json")
    return float(_load_json(summary)["foreground_mean"]["Dice"]) if os.path.isfile(summary) else None


def run_sequence_command(args) -> int:
    run_sequence(args)
    return 0


def run_sequence(args) -> list:
    """Run (or continue, or skip) every stage; returns the stage records."""
    from nnunet_plugins.atomic import write_json
    from nnunet_plugins.trainers.medseqft import StageContext

    opts = options_from_args(args)
    fold = _fold(args.fold)
    device = _device(args.device)
    method = "plain" if args.plain else "medseqft"
    # every check before any training
    m0 = InitModel(args.init, args.configuration)
    names = [dataset_name(d) for d in args.sequence]
    if len(set(names)) != len(names):
        raise ValueError(f"--sequence lists a dataset twice: {names}")
    check_channels(names, m0.dataset_json, m0.checkpoint)
    m0.unet()
    folders = [prepare_dataset(n, m0.plans, args.plans_name, args.configuration, args.num_processes) for n in names]
    student_name = "SequentialFTTrainer" if args.plain else "MedSeqFTTrainer"
    tasks, records, previous, m0_model = [], [], m0.checkpoint, None
    for t, (name, folder) in enumerate(zip(names, folders), start=1):
        ds_json = raw_dataset_json(name)
        tasks.append({"dataset": name, "labels": ds_json["labels"],
                      "num_classes": _label_manager(m0.plans, ds_json).num_segmentation_heads})
        out = stage_folder(name, student_name, args.plans_name, args.configuration, fold)
        expected = {"method": method, "stage": t, "sequence": names[:t], "init": m0.checkpoint,
                    "options": opts.to_dict(), "plans": args.plans_name, "configuration": args.configuration,
                    "fold": fold}
        record_file = os.path.join(out, STAGE_RECORD)
        if os.path.isfile(record_file):
            record = _load_json(record_file)
            differs = sorted(k for k in expected if record.get(k) != expected[k])
            if differs:
                raise ValueError(f"{record_file} belongs to another run (differs in {differs}); use another "
                                 f"--plans-name or remove that folder")
            print(f"stage {t} ({name}): finished, skipped")
            records.append(record)
            previous = os.path.join(out, "checkpoint_final.pth")
            continue
        print(f"stage {t} ({name}): {method}")
        from nnunet_plugins.trainers import medseqft as tr

        seconds, clock = {}, _Clock(device)

        context = StageContext(stage=t, tasks=copy.deepcopy(tasks), previous=previous, options=opts)
        if args.plain:
            student = _make_trainer(tr.SequentialFTTrainer, name, args.plans_name, args.configuration, fold, device,
                                    args)
        else:
            teacher = _make_trainer(tr.MedSeqFTTeacherTrainer, name, args.plans_name, args.configuration, fold,
                                    device, args)
            train_ids, _ = teacher.do_split()
            buffer_file = os.path.join(out, BUFFER_FILE)
            if not os.path.isfile(buffer_file):
                clock.start()
                if m0_model is None:
                    head_file = os.path.join(stage_folder(names[0], student_name, args.plans_name, args.configuration,
                                                          fold), M0_HEAD_FILE)
                    m0_model = m0_reconstruction(m0, args, opts, head_file, folders[0], device)
                write_stage_buffer(*m0_model, opts, t, name, folder, train_ids, fold, buffer_file)
                seconds["buffer"] = clock.stop()
            teacher.set_stage(context)
            clock.start()
            context.teacher = train_phase(teacher)
            seconds["teacher"] = clock.stop()
            del teacher
            context.buffers = [{"task": j, "folder": folders[j], "case_ids": _buffer_ids(
                stage_folder(names[j], student_name, args.plans_name, args.configuration, fold))} for j in range(t - 1)]
            student = _make_trainer(tr.MedSeqFTTrainer, name, args.plans_name, args.configuration, fold, device, args)
        student.set_stage(context)
        clock.start()
        final = train_phase(student)
        seconds["student"] = clock.stop()
        dice = None if args.no_val else _validate(student, final)
        # cost of what THIS invocation did (a continued stage counts only its rest)
        record = dict(expected, dataset=name, checkpoint=final, validation_dice=dice,
                      buffer=None if args.plain else os.path.join(out, BUFFER_FILE), seconds=seconds,
                      peak_memory_mib=clock.peak_mib())
        write_json(record, record_file)
        print(f"stage {t} ({name}) finished: {final}" + ("" if dice is None else f", validation Dice {dice:.4f}"))
        records.append(record)
        previous = final
    return records


def _buffer_ids(folder: str) -> list:
    from nnunet_plugins.training.mds import read_buffer

    return list(read_buffer(os.path.join(folder, BUFFER_FILE))["case_ids"])


def m0_reconstruction(m0: InitModel, args, opts, head_file: str, data_folder: str, device):
    """M_0 with its reconstruction head (trained briefly on the frozen network when the checkpoint has none;
    kept in ``head_file`` so that every stage and every rerun scores with the same head)."""
    from nnunet_plugins.trainers.medseqft import patch_loader, train_reconstruction

    model, cm = m0.reconstruction_network()
    if m0.head is None:
        model.network.requires_grad_(False)
        source = patch_loader(data_folder, None, cm.batch_size, cm.patch_size,
                              _label_manager(m0.plans, m0.dataset_json))
        if not os.path.isfile(head_file):
            print(f"--init has no reconstruction head: training one on the frozen network "
                  f"({args.head_iterations} steps)")
        train_reconstruction(model, [source], opts.objective(), args.head_iterations, model.head.parameters(),
                             head_file, device=device, seed=opts.seed)
    return model.to(device), list(cm.patch_size)


def write_stage_buffer(model, patch_size, opts, t: int, name: str, folder: str, train_ids, fold,
                       buffer_file: str) -> None:
    """MDS: score the stage's training cases with M_0 and keep the K lowest (atomic JSON)."""
    from nnunet_plugins.training.mds import buffer_record, mds_scores, preprocessed_images, write_buffer

    scores = mds_scores(model, preprocessed_images(folder, sorted(train_ids)), patch_size, opts.objective(),
                        opts.repeats, opts.seed, opts.mds_patches)
    write_buffer(buffer_file, buffer_record(t, scores, opts.k, opts.repeats, opts.seed, opts.objective(),
                                            dataset=name, fold=fold, patches=opts.mds_patches))
    print(f"  MDS buffer B_{t}: {len(scores)} cases scored, kept {min(opts.k, len(scores))} -> {buffer_file}")


# ---- predict ------------------------------------------------------------------------------------------------
def run_predict(args) -> int:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_plugins.trainers.medseqft import PLANS_KEY

    device = _device(args.device)
    name = dataset_name(args.dataset)
    fold = _fold(args.fold)
    folder = os.path.dirname(stage_folder(name, args.trainer, args.plans_name, args.configuration, fold))
    if not os.path.isfile(os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth")):
        raise FileNotFoundError(f"no finished stage model in {folder}/fold_{fold}")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not args.disable_tta,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, (fold,), "checkpoint_final.pth")
    tasks = [t["dataset"] for t in predictor.plans_manager.plans[PLANS_KEY]["tasks"]]
    task_name = name if args.task is None else dataset_name(args.task)
    if task_name not in tasks:
        raise ValueError(f"the model of {folder} knows the tasks {tasks}, not {task_name}")
    task = tasks.index(task_name)
    if task_name != name:   # the earlier task's preprocessing (its stage's plans and dataset.json)
        task_folder = os.path.dirname(stage_folder(task_name, args.trainer, args.plans_name, args.configuration,
                                                   fold))
        pm = PlansManager(os.path.join(task_folder, "plans.json"))
        cm = pm.get_configuration(args.configuration)
        if list(cm.patch_size) != list(predictor.configuration_manager.patch_size):
            raise ValueError(f"{task_folder} was trained with another patch than {folder}")
        ds_json = _load_json(os.path.join(task_folder, "dataset.json"))
        predictor.plans_manager, predictor.configuration_manager = pm, cm
        predictor.dataset_json, predictor.label_manager = ds_json, pm.get_label_manager(ds_json)
    predictor.network.set_task(task)
    predictor.predict_from_files(args.input, args.output, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    print(f"task {task + 1} ({task_name}) predicted with the model of stage {len(tasks)} ({name}) -> {args.output}")
    return 0

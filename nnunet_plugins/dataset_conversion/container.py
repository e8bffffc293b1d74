"""Inference entry points for the container-style challenges (what goes inside the submission container).

    python -m nnunet_plugins.dataset_conversion.container kits21     --model MODEL [--input /input] [--output /output]
    python -m nnunet_plugins.dataset_conversion.container segrap2023 --model MODEL [--task 1|2]
    python -m nnunet_plugins.dataset_conversion.container amos22     --model MODEL
    (also: nnunet-plugins challenge-infer CHALLENGE ...)

``MODEL`` is an nnU-Net training output folder (``nnUNet_results/DatasetXXX_Name/Trainer__Plans__config`` with
dataset.json, plans.json and ``fold_X/checkpoint_final.pth``); prediction uses nnU-Net's ``nnUNetPredictor``.

* KiTS21: ``/input/images/ct/<name>.mha`` -> ``/output/images/kidney-tumor-and-cyst/<name>.mha`` (labels 1-3). The
  .mha is mapped to the KiTS NIfTI layout the way the organisers' own example does (see
  :mod:`nnunet_plugins.dataset_conversion.kits21`), so the model sees test images as it saw the training data.
* SegRap2023: ``/input/images/head-neck-ct/<uuid>.mha`` + ``/input/images/head-neck-contrast-enhanced-ct/<uuid>.mha``
  -> one 4-D uint8 .mha per case in ``/output/images/head-neck-segmentation/`` (task 1, 45 OARs) or
  ``/output/images/gross-tumor-volume-segmentation/`` (task 2), channels in the official order.
* AMOS22 (test phase): ``/input/*.nii.gz`` -> ``/output/<same name>.nii.gz`` (labels 0-15, input geometry).

Outputs are written atomically and in the input image's exact geometry.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile

from .common import ChallengeError, list_images
from .input_check import check_cases


def _check_inputs(predictor, cases: dict, where: str) -> None:
    """Channels, complete decoding and channel geometry of every input before any prediction."""
    check_cases(cases, len(predictor.dataset_json["channel_names"]), where)

CONTAINER_CHALLENGES = ("kits21", "segrap2023", "amos22")


def load_predictor(model_dir: str, folds=None, checkpoint: str = "checkpoint_final.pth", device: str = "auto",
                   step_size: float = 0.5, mirroring: bool = True):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    for f in ("dataset.json", "plans.json"):
        if not os.path.isfile(os.path.join(model_dir, f)):
            raise ChallengeError(f"{model_dir} is not an nnU-Net model folder (no {f}); pass the training output "
                                 "folder nnUNet_results/DatasetXXX_Name/Trainer__Plans__configuration")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS", "8")))))
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    if folds is not None:
        folds = tuple(f if f == "all" else int(f) for f in folds)
    predictor.initialize_from_trained_model_folder(model_dir, folds, checkpoint)
    return predictor


def _predict(predictor, cases: dict, work_dir: str) -> dict:
    """cases = {name: [channel files]} -> {name: prediction file} (nnU-Net's output in ``work_dir``)."""
    names = list(cases)
    out_dir = os.path.join(work_dir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    predictor.predict_from_files_sequential([cases[n] for n in names], [os.path.join(out_dir, n) for n in names],
                                            save_probabilities=False, overwrite=True)
    ending = predictor.dataset_json["file_ending"]
    result = {n: os.path.join(out_dir, n + ending) for n in names}
    missing = [n for n, p in result.items() if not os.path.isfile(p)]
    if missing:
        raise ChallengeError(f"nnU-Net wrote no prediction for {', '.join(missing)}")
    return result


def run_kits21(input_dir: str, output_dir: str, predictor, work_dir: str) -> list:
    from .kits21 import INPUT_SUBDIR, OUTPUT_SUBDIR, kits_nifti_to_mha, mha_to_kits_nifti

    inputs = list_images(os.path.join(input_dir, INPUT_SUBDIR), (".mha",))
    if not inputs:
        raise ChallengeError(f"no .mha images in {os.path.join(input_dir, INPUT_SUBDIR)}")
    if predictor.dataset_json["file_ending"] != ".nii.gz":
        raise ChallengeError("the KiTS21 model must be trained on the NIfTI release (file ending .nii.gz)")
    _check_inputs(predictor, {n: [p] for n, p in inputs.items()}, os.path.join(input_dir, INPUT_SUBDIR))
    cases = {}
    for name, path in inputs.items():
        nifti = os.path.join(work_dir, "inputs", f"{name}_0000.nii.gz")
        mha_to_kits_nifti(name, path, nifti)
        cases[name] = [nifti]
    predictions = _predict(predictor, cases, work_dir)
    written = []
    for name, pred in predictions.items():
        out = os.path.join(output_dir, OUTPUT_SUBDIR, f"{name}.mha")
        kits_nifti_to_mha(name, pred, inputs[name], out)
        written.append(out)
    return written


def _segrap_pairs(input_dir: str) -> dict:
    from .segrap2023 import GC_INPUTS
    ct = list_images(os.path.join(input_dir, GC_INPUTS[0]), (".mha",)) if os.path.isdir(
        os.path.join(input_dir, GC_INPUTS[0])) else {}
    cect = list_images(os.path.join(input_dir, GC_INPUTS[1]), (".mha",)) if os.path.isdir(
        os.path.join(input_dir, GC_INPUTS[1])) else {}
    if not ct or not cect:
        raise ChallengeError(f"SegRap2023 input needs .mha files in both {os.path.join(input_dir, GC_INPUTS[0])} and "
                             f"{os.path.join(input_dir, GC_INPUTS[1])}")
    if len(ct) == 1 and len(cect) == 1:   # one case per run: the two files may carry different ids
        (name, path), (_, path_c) = next(iter(ct.items())), next(iter(cect.items()))
        return {name: (path, path_c)}
    unmatched = sorted(set(ct) ^ set(cect))
    if unmatched:
        raise ChallengeError(f"cannot pair non-contrast and contrast CT inputs; unmatched: {', '.join(unmatched)}")
    return {n: (ct[n], cect[n]) for n in ct}


def run_segrap2023(input_dir: str, output_dir: str, predictor, work_dir: str, task: int | None = None) -> list:
    import SimpleITK as sitk
    from .common import DEFAULT_GEOMETRY_TOLERANCE
    from .segrap2023 import CLASSES, export_case

    labels = predictor.dataset_json["labels"]
    model_task = {len(CLASSES[1]) + 1: 1, len(CLASSES[2]) + 1: 2}.get(len(labels))
    if model_task is None:
        raise ChallengeError(f"the model predicts {len(labels)} labels; a SegRap2023 model has 55 (task 1) "
                             "or 3 (task 2)")
    if task is not None and task != model_task:
        raise ChallengeError(f"task {task} requested but the model is a task {model_task} model")
    if len(predictor.dataset_json["channel_names"]) != 2:
        raise ChallengeError("a SegRap2023 model takes two channels (non-contrast CT, contrast CT)")
    ending = predictor.dataset_json["file_ending"]
    pairs = _segrap_pairs(input_dir)
    _check_inputs(predictor, {n: list(p) for n, p in pairs.items()}, input_dir)
    cases = {}
    for name, pair in pairs.items():
        files = []
        for c, src in enumerate(pair):
            dst = os.path.join(work_dir, "inputs", f"{name}_{c:04d}{ending}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            sitk.WriteImage(sitk.ReadImage(src), dst, True)
            files.append(dst)
        cases[name] = (files, pair[0])
    predictions = _predict(predictor, {n: f for n, (f, _) in cases.items()}, work_dir)
    written = []
    for name, pred in predictions.items():
        written += export_case(name, pred, cases[name][1], model_task, "grand-challenge", output_dir,
                               DEFAULT_GEOMETRY_TOLERANCE)
    return written


def run_amos22(input_dir: str, output_dir: str, predictor, work_dir: str) -> list:
    from .amos22 import export_case
    from .common import DEFAULT_GEOMETRY_TOLERANCE

    inputs = list_images(input_dir, (".nii.gz",))
    if not inputs:
        raise ChallengeError(f"no .nii.gz images in {input_dir}")
    _check_inputs(predictor, {n: [p] for n, p in inputs.items()}, input_dir)
    predictions = _predict(predictor, {n: [p] for n, p in inputs.items()}, work_dir)
    return [export_case(n, predictions[n], inputs[n], os.path.join(output_dir, f"{n}.nii.gz"),
                        DEFAULT_GEOMETRY_TOLERANCE) for n in inputs]


def run(challenge: str, model: str, input_dir: str = "/input", output_dir: str = "/output", folds=None,
        checkpoint: str = "checkpoint_final.pth", device: str = "auto", step_size: float = 0.5,
        mirroring: bool = True, task: int | None = None, work_dir: str | None = None) -> list:
    """Run the container entry point of ``challenge``; returns the files written."""
    runners = {"kits21": run_kits21, "segrap2023": functools.partial(run_segrap2023, task=task),
               "amos22": run_amos22}
    if challenge not in runners:
        raise ChallengeError(f"no container entry point for {challenge!r}; "
                             f"choose from {', '.join(CONTAINER_CHALLENGES)}")
    if not os.path.isdir(input_dir):
        raise ChallengeError(f"input folder not found: {input_dir}")
    predictor = load_predictor(model, folds, checkpoint, device, step_size, mirroring)
    tmp = tempfile.mkdtemp(prefix="nnunet_plugins_infer_", dir=work_dir)
    try:
        return runners[challenge](input_dir, output_dir, predictor, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("challenge", choices=CONTAINER_CHALLENGES)
    p.add_argument("--model", default=os.environ.get("NNUNET_PLUGINS_MODEL"),
                   help="nnU-Net model folder (training output with dataset.json, plans.json, fold_X); "
                        "default: $NNUNET_PLUGINS_MODEL")
    p.add_argument("--input", default="/input", help="the organisers' input folder (default /input)")
    p.add_argument("--output", default="/output", help="the organisers' output folder (default /output)")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: all found)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--task", type=int, choices=(1, 2), default=None,
                   help="SegRap2023 task (default: from the model's labels)")
    p.add_argument("--work-dir", default=None, help="folder for temporary files (default: system temp)")


def run_from_args(args) -> int:
    if not args.model:
        raise ChallengeError("--model is required (or set NNUNET_PLUGINS_MODEL)")
    written = run(args.challenge, args.model, args.input, args.output, args.folds, args.checkpoint, args.device,
                  args.step_size, not args.disable_tta, args.task, args.work_dir)
    for w in written:
        print(w)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnunet_plugins.dataset_conversion.container",
                                description="Challenge container inference with an nnU-Net model.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except ChallengeError as e:
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

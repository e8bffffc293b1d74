"""Challenge commands: ``convert``, ``export``, ``evaluate``, ``synth-release`` and ``challenge-infer``.

    nnunet-plugins convert  CHALLENGE RELEASE_DIR [-d ID] [--task T] ...   release -> nnUNet_raw/DatasetXXX_Name
    nnunet-plugins export   CHALLENGE PRED_DIR OUT_DIR --images REF ...   nnU-Net predictions -> submission
    nnunet-plugins evaluate CHALLENGE PRED GT ...                          official metrics, tables, summary
    nnunet-plugins synth-release CHALLENGE OUT_DIR                         small synthetic release
    nnunet-plugins challenge-infer CHALLENGE --model MODEL [--input /input] [--output /output]

CHALLENGE is one of kits21, amos22, segrap2023, myops2020, kipa22. The same functions are importable from
``nnunet_plugins.dataset_conversion.<challenge>`` (convert, export) and ``nnunet_plugins.evaluation.<challenge>``
(evaluate).
"""
from __future__ import annotations

import importlib

CHALLENGES = ("kits21", "amos22", "segrap2023", "myops2020", "kipa22")
TASK_CHALLENGES = ("amos22", "segrap2023")


def _common(p) -> None:
    p.add_argument("-np", "--num-processes", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> None:
    # ------------------------------------------------------------------ convert
    p = subparsers.add_parser(
        "convert", help="convert a challenge release into an nnU-Net raw dataset",
        description="Convert the release folder of a challenge, exactly as the organisers ship it, into "
                    "$nnUNet_raw/DatasetXXX_Name (imagesTr, labelsTr, imagesTs, dataset.json). The dataset is built "
                    "in a hidden .partial folder and renamed when complete; a rerun resumes, --overwrite starts "
                    "clean.")
    p.add_argument("challenge", choices=CHALLENGES)
    p.add_argument("release_dir", help="the release folder (kits21/data, amos22/, the SegRap2023 download folder, "
                                       "the MyoPS2020 folder with train25/, the KiPA22 folder with train/)")
    p.add_argument("-d", "--dataset-id", type=int, default=None, help="nnU-Net dataset ID (default per challenge: "
                   "kits21 135, amos22 218/219, segrap2023 601/602, myops2020 159, kipa22 603)")
    p.add_argument("--name", default=None, help="dataset name (default per challenge)")
    p.add_argument("--raw", default=None, help="nnU-Net raw folder (default $nnUNet_raw)")
    p.add_argument("--task", type=int, choices=(1, 2), default=None,
                   help="amos22: 1 = CT, 2 = CT+MRI (default 2); segrap2023: 1 = OARs, 2 = GTVs (default 1)")
    p.add_argument("--kits-label", choices=("majority", "and", "or"), default="majority",
                   help="kits21: training label (aggregated MAJ/AND/OR segmentation; default majority)")
    p.add_argument("--no-merge-validation", action="store_true",
                   help="amos22: keep the validation cases out of training (written to imagesVal/labelsVal)")
    p.add_argument("--segrap-labels", choices=("auto", "map", "masks"), default="auto",
                   help="segrap2023: labels from the shipped label maps, from the organ masks, or auto (maps if "
                        "present)")
    p.add_argument("--check-masks", action="store_true",
                   help="segrap2023: also check every shipped label map against the organ masks")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed geometry difference between files of a case (mm / direction cosine; "
                        "default 1e-4)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing or partial dataset and start clean")
    _common(p)
    p.set_defaults(func=run_convert)

    # ------------------------------------------------------------------ export
    p = subparsers.add_parser(
        "export", help="turn nnU-Net predictions into a challenge submission",
        description="Convert an nnU-Net prediction folder into the challenge's submission format: original label "
                    "values, file names and layout, the input images' exact geometry, and an archive where the "
                    "challenge takes one. Every case of --images must have a prediction.")
    p.add_argument("challenge", choices=CHALLENGES)
    p.add_argument("pred_dir", help="nnU-Net prediction folder")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--images", required=True,
                   help="the input images the predictions belong to (expected cases and geometry): the release's "
                        "test/validation images, nnU-Net's imagesTs, or the grand-challenge /input folder")
    p.add_argument("--task", type=int, choices=(1, 2), default=None, help="amos22 / segrap2023 task")
    p.add_argument("--format", choices=("validation", "grand-challenge"), default="validation",
                   help="segrap2023: per-organ validation layout + zip, or the test-phase 4-D .mha")
    p.add_argument("--archive", default="auto", help="amos22/segrap2023: zip path (default: in OUT_DIR)")
    p.add_argument("--no-archive", action="store_true", help="do not write the zip")
    p.add_argument("--suffix", default=None, help="myops2020: file name suffix (default _seg)")
    p.add_argument("--tolerance", type=float, default=None, help="allowed geometry difference to the input image")
    _common(p)
    p.set_defaults(func=run_export)

    # ------------------------------------------------------------------ evaluate
    p = subparsers.add_parser(
        "evaluate", help="score predictions with a challenge's official metrics",
        description="Compute the challenge's official metrics with its rules; writes per-case and summary tables "
                    "(CSV and JSON) and prints the summary.")
    p.add_argument("challenge", choices=CHALLENGES)
    p.add_argument("pred", help="predictions (folder; amos22/segrap2023 also their submission zip)")
    p.add_argument("gt", help="reference: the release (or its label folder)")
    p.add_argument("-o", "--output", default=None, help="folder for the tables (default: the prediction folder)")
    p.add_argument("--task", type=int, choices=(1, 2), default=None, help="segrap2023 task (default 1)")
    p.add_argument("--reference", choices=("both", "majority", "samples"), default="both",
                   help="kits21: majority vote, annotation samples, or both (samples where present)")
    p.add_argument("--tolerances", choices=("final", "older"), default="final",
                   help="kits21: surface Dice tolerances of the final or the older labels.py revision")
    p.add_argument("--tolerance-mm", type=float, default=None, help="amos22: NSD tolerance (default 1 mm)")
    p.add_argument("--no-round", action="store_true",
                   help="segrap2023: keep full precision (the official script rounds per-case values to 4 decimals)")
    p.add_argument("--labels", choices=("auto", "original", "nnunet"), default="auto",
                   help="myops2020: label values of the files")
    p.add_argument("--official-spacing-bug", action="store_true",
                   help="kipa22: reproduce the official script's spacing error when resampling the prediction")
    _common(p)
    p.set_defaults(func=run_evaluate)

    # ------------------------------------------------------------------ synth-release
    p = subparsers.add_parser(
        "synth-release", help="write a small synthetic release in a challenge's exact layout",
        description="Write a tiny synthetic release of a challenge (names, folders, channels, label values, "
                    "geometry conventions) for tests and demos.")
    p.add_argument("challenge", choices=CHALLENGES)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_synth)

    # ------------------------------------------------------------------ challenge-infer
    from nnunet_plugins.dataset_conversion.container import add_arguments
    p = subparsers.add_parser(
        "challenge-infer", help="container inference entry point (grand-challenge input/output layout)",
        description="Read the organisers' input folder layout, predict with a trained nnU-Net model and write their "
                    "output layout (kits21, segrap2023, amos22 test phase).")
    add_arguments(p)
    p.set_defaults(func=run_infer)


def _module(kind: str, challenge: str):
    return importlib.import_module(f"nnunet_plugins.{kind}.{challenge}")


def _opt(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def run_convert(args) -> int:
    m = _module("dataset_conversion", args.challenge)
    common = _opt(raw=args.raw, dataset_id=args.dataset_id, name=args.name, num_processes=args.num_processes,
                  overwrite=args.overwrite, tolerance=args.tolerance, progress=not args.no_progress)
    if args.challenge == "kits21":
        folder = m.convert(args.release_dir, label_source=args.kits_label, **common)
    elif args.challenge == "amos22":
        folder = m.convert(args.release_dir, task=args.task or 2, merge_validation=not args.no_merge_validation,
                           **common)
    elif args.challenge == "segrap2023":
        folder = m.convert(args.release_dir, task=args.task or 1, labels=args.segrap_labels,
                           check_masks=args.check_masks, **common)
    else:
        folder = m.convert(args.release_dir, **common)
    print(folder)
    return 0


def run_export(args) -> int:
    m = _module("dataset_conversion", args.challenge)
    common = _opt(num_processes=args.num_processes, tolerance=args.tolerance, progress=not args.no_progress)
    archive = None if args.no_archive else args.archive
    if args.challenge == "amos22":
        result = m.export(args.pred_dir, args.out_dir, args.images, task=args.task or 2, archive=archive, **common)
    elif args.challenge == "segrap2023":
        result = m.export(args.pred_dir, args.out_dir, args.images, task=args.task or 1, out_format=args.format,
                          archive=archive, **common)
    elif args.challenge == "myops2020":
        result = m.export(args.pred_dir, args.out_dir, args.images, **_opt(suffix=args.suffix), **common)
    else:
        result = m.export(args.pred_dir, args.out_dir, args.images, **common)
    files = result["files"] if isinstance(result, dict) else result
    print(f"wrote {len(files)} files to {args.out_dir}")
    if isinstance(result, dict) and result.get("archive"):
        print(f"archive: {result['archive']}")
    return 0


def run_evaluate(args) -> int:
    m = _module("evaluation", args.challenge)
    common = dict(out_dir=args.output, num_processes=args.num_processes, progress=not args.no_progress)
    if args.challenge == "kits21":
        m.evaluate(args.pred, args.gt, reference=args.reference, tolerances=args.tolerances, **common)
    elif args.challenge == "amos22":
        m.evaluate(args.pred, args.gt, **_opt(tolerance_mm=args.tolerance_mm), **common)
    elif args.challenge == "segrap2023":
        m.evaluate(args.pred, args.gt, task=args.task or 1, round_decimals=None if args.no_round else 4, **common)
    elif args.challenge == "myops2020":
        m.evaluate(args.pred, args.gt, labels=args.labels, **common)
    else:
        m.evaluate(args.pred, args.gt, official_spacing_bug=args.official_spacing_bug, **common)
    return 0


def run_synth(args) -> int:
    from nnunet_plugins.dataset_conversion.synthetic_releases import generate
    print(generate(args.challenge, args.out_dir, seed=args.seed, overwrite=args.overwrite))
    return 0


def run_infer(args) -> int:
    from nnunet_plugins.dataset_conversion.container import run_from_args
    return run_from_args(args)

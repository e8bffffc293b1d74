"""``nnunet-plugins semi``: unlabeled images (imagesUn) and the labeled-fraction protocol for semi-supervised
training (see ``nnunet_plugins.semi``)."""
from __future__ import annotations

import os


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("semi", help="semi-supervised data: preprocess imagesUn, labeled-fraction splits",
                              description="Unlabeled data for semi-supervised trainers.")
    sub = p.add_subparsers(dest="semi_command", metavar="SUBCOMMAND")
    sub.required = True

    pre = sub.add_parser(
        "preprocess", help="preprocess the unlabeled images (imagesUn) with the dataset's nnU-Net plans",
        description="Run nnU-Net's preprocessor of the plans' configuration on every case of "
                    "$nnUNet_raw/DatasetXXX/imagesUn (no segmentation) into "
                    "$nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled. Finished cases are skipped, so "
                    "an interrupted run continues where it stopped.")
    pre.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    pre.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    pre.add_argument("-c", "--configurations", nargs="+", default=None,
                     help="configurations (default: those already preprocessed for the labeled cases)")
    pre.add_argument("-np", "--num-processes", type=int, default=1)
    pre.add_argument("--no-progress", action="store_true")
    pre.set_defaults(func=run_preprocess)

    sp = sub.add_parser(
        "split", help="labeled-fraction protocol: keep the labels of N (or P%%) training cases per fold",
        description="For every fold of splits_final.json (nnU-Net's default 5-fold split is created first if "
                    "there is none), keep the labels of N training cases (or P%%, rounded) and use the others as "
                    "unlabeled; validation cases are untouched. Writes splits_semi.json next to splits_final.json.")
    sp.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    sp.add_argument("--labeled", required=True, help="labeled training cases per fold: a number (8) or a percentage "
                                                     "(10%%)")
    sp.add_argument("--seed", type=int, default=12345, help="seed of the labeled subset (default 12345)")
    sp.add_argument("--per-task", action="store_true",
                    help="combined multi-task dataset: the number / percentage applies within each task's training "
                         "cases of a fold (every source keeps its own labeled fraction)")
    sp.set_defaults(func=run_split)


def _folders(dataset: str):
    from nnunet_plugins.multitask.combine import resolve_dataset_folder

    raw_root, pre_root = os.environ.get("nnUNet_raw"), os.environ.get("nnUNet_preprocessed")
    if not pre_root:
        raise ValueError("nnUNet_preprocessed is not set")
    raw_folder = None
    if raw_root and os.path.isdir(raw_root):
        try:
            raw_folder = resolve_dataset_folder(raw_root, dataset)
        except FileNotFoundError:
            raw_folder = None
    if raw_folder is not None:
        return raw_folder, os.path.join(pre_root, os.path.basename(raw_folder))
    return None, resolve_dataset_folder(pre_root, dataset)


def run_preprocess(args) -> int:
    from nnunet_plugins.semi.preprocess import preprocess_unlabeled

    report = preprocess_unlabeled(args.dataset, args.plans, args.configurations, args.num_processes,
                                  progress=not args.no_progress)
    for configuration, r in report.items():
        print(f"{configuration}: {len(r['done'])} case(s) preprocessed, {len(r['skipped'])} already done -> "
              f"{r['folder']}")
    return 0


def run_split(args) -> int:
    import json

    from nnunet_plugins.semi.split import write_semi_split

    raw_folder, pre_folder = _folders(args.dataset)
    path = write_semi_split(pre_folder, args.labeled, args.seed, raw_dataset_folder=raw_folder,
                            per_task=args.per_task)
    with open(path) as f:
        content = json.load(f)
    for k, fold in enumerate(content["splits"]):
        print(f"fold {k}: {len(fold['labeled'])} labeled, {len(fold['unlabeled'])} unlabeled training cases, "
              f"{len(fold['val'])} validation")
    print(f"written: {path}")
    return 0

"""Multi-task datasets: ``combine``, ``predict-multitask`` and ``export-multitask``.

``nnunet-plugins combine -d 501 502 -o 600 [-n Universal] [--tags A B]``
    combine nnU-Net raw datasets into one universal raw dataset (see nnunet_plugins.multitask.combine).
``nnunet-plugins predict-multitask -i IN -o OUT -d 600 -tr UniSegTrainer -c 3d_fullres -f 0``
    predict every case for its task (case-name prefix, or ``--task TAG`` for raw images of one source
    task); ``--source-labels DIR`` also writes DIR/<tag>/<case> in the source dataset's label values.
``nnunet-plugins export-multitask -i PRED -o OUT -d 600``
    write combined-label predictions (e.g. nnU-Net's validation folder) in the source labels.
"""
from __future__ import annotations

import json
import os


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("combine", help="combine several nnU-Net raw datasets into one universal dataset",
                              description="Combine nnU-Net raw datasets into ONE universal raw dataset for "
                                          "multi-task training (UniSeg, DoDNet, TransDoDNet): cases prefixed by "
                                          "their task tag, labels as the disjoint union of the sources' labels, "
                                          "images normalised per source (channels noNorm), task tables in "
                                          "dataset.json['multitask'].")
    p.add_argument("-d", "--datasets", nargs="+", required=True, help="source dataset IDs, names or folders")
    p.add_argument("-o", "--output-id", type=int, required=True, help="ID of the combined dataset")
    p.add_argument("-n", "--name", default="Universal", help="name of the combined dataset (default Universal)")
    p.add_argument("--tags", nargs="+", default=None,
                   help="task tags (letters and digits), one per source; default: the source dataset names")
    p.add_argument("--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    from nnunet_plugins.dataset_conversion.common import default_num_processes
    p.add_argument("-np", "--num-processes", type=int, default=default_num_processes(),
                   help=f"worker processes (default {default_num_processes()}: $nnUNet_def_n_proc, else nnU-Net's "
                        "default, as every nnU-Net command)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing combined dataset")
    p.set_defaults(func=run_combine)

    p = subparsers.add_parser("predict-multitask", help="predict each case for its task with a multi-task model",
                              description="nnU-Net prediction with a multi-task model: every case is predicted for "
                                          "its own task, taken from its '<tag>_' name prefix or from --task. "
                                          "Outputs are in the combined dataset's labels; --source-labels also "
                                          "writes them in each source dataset's labels.")
    p.add_argument("-i", "--input", required=True,
                   help="images in the combined format (<tag>_<case>_<cccc>.nii.gz), or with --task raw images of "
                        "that source task in its own format")
    p.add_argument("-o", "--output", required=True, help="output folder (combined label values)")
    p.add_argument("-d", "--dataset", default=None, help="combined dataset ID or name")
    p.add_argument("-tr", "--trainer", default="UniSegTrainer")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-m", "--model-folder", default=None, help="model folder (instead of -d/-tr/-c/-p)")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds (default: all found)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--task", default=None, help="predict every case for this task (tag or id)")
    p.add_argument("--source-labels", default=None, metavar="DIR",
                   help="also write DIR/<tag>/<source case><source ending> in the source dataset's label values")
    p.add_argument("-device", "--device", default="cuda", choices=("cuda", "cpu", "mps"))
    p.add_argument("--step-size", type=float, default=0.5)
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("-npp", type=int, default=2, help="preprocessing processes (0: in this process)")
    p.add_argument("-nps", type=int, default=2, help="export processes (0: in this process)")
    p.set_defaults(func=run_predict)

    p = subparsers.add_parser("export-multitask", help="write combined-label predictions in the source labels",
                              description="Write predictions in the combined dataset's labels (files "
                                          "<tag>_<case>.nii.gz) as OUT/<tag>/<case><source ending> in each source "
                                          "dataset's label values.")
    p.add_argument("-i", "--input", required=True, help="folder of combined-label predictions")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-d", "--dataset", default=None, help="combined dataset ID or name (its raw dataset.json)")
    p.add_argument("--dataset-json", default=None, help="the combined dataset.json (instead of -d)")
    p.add_argument("--flat", action="store_true", help="no <tag>/ subfolders")
    p.set_defaults(func=run_export)


def _raw_root(args) -> str:
    root = getattr(args, "raw", None) or os.environ.get("nnUNet_raw")
    if not root:
        raise ValueError("nnUNet_raw is not set (or pass --raw)")
    return root


def run_combine(args) -> int:
    from nnunet_plugins.multitask.combine import combine_datasets

    folder = combine_datasets(args.datasets, args.output_id, args.name, raw_root=_raw_root(args), tags=args.tags,
                              overwrite=args.overwrite, num_processes=args.num_processes)
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.output_id} -c 3d_fullres")
    print(f"then: nnUNetv2_train {args.output_id} 3d_fullres FOLD -tr TRAINER  (UniSegTrainer, DoDNetTrainer or "
          f"TransDoDNetTrainer)")
    return 0 if folder else 1


def _model_folder(args) -> str:
    if args.model_folder:
        return args.model_folder
    if args.dataset is None:
        raise ValueError("give the model with -d DATASET [-tr -c -p] or -m MODEL_FOLDER")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    name = maybe_convert_to_dataset_name(int(args.dataset) if str(args.dataset).isdigit() else args.dataset)
    return get_output_folder(name, args.trainer, args.plans, args.configuration)


def run_predict(args) -> int:
    import torch

    from nnunet_plugins.multitask.prediction import predict_multitask

    folder = _model_folder(args)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder} does not exist")
    folds = None if args.folds is None else [f if f == "all" else int(f) for f in args.folds]
    if args.device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    written = predict_multitask(folder, args.input, args.output, folds=folds, checkpoint_name=args.checkpoint,
                                task=args.task, source_labels_folder=args.source_labels,
                                device=torch.device(args.device), tile_step_size=args.step_size,
                                use_mirroring=not args.disable_tta, num_processes_preprocessing=args.npp,
                                num_processes_export=args.nps)
    print(f"wrote {len(written)} predictions")
    return 0


def run_export(args) -> int:
    from nnunet_plugins.multitask.metadata import MultiTaskSpec
    from nnunet_plugins.multitask.prediction import export_folder_to_source

    if args.dataset_json:
        dj_file = args.dataset_json
    elif args.dataset is not None:
        from nnunet_plugins.multitask.combine import resolve_dataset_folder

        dj_file = os.path.join(resolve_dataset_folder(_raw_root(args), args.dataset), "dataset.json")
    else:
        raise ValueError("give the combined dataset with -d or --dataset-json")
    with open(dj_file) as f:
        dj = json.load(f)
    spec = MultiTaskSpec.from_dataset_json(dj, allow_implicit=False)
    written = export_folder_to_source(spec, args.input, args.output, dj.get("file_ending", ".nii.gz"),
                                      subfolder_per_task=not args.flat)
    print(f"wrote {len(written)} files to {args.output}")
    return 0

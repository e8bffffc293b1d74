"""``nnunet-plugins plan``: run a method's experiment planner (and optionally nnU-Net's preprocessing).

nnU-Net's ``nnUNetv2_plan_experiment -pl`` only finds planners inside nnunetv2's own folders, so
plugin planners run through this command. It extracts the dataset fingerprint if it is missing,
writes ``$nnUNet_preprocessed/DatasetXXX/<plans name>.json`` and prints the nnU-Net commands that use
it. With ``--preprocess`` it also runs nnU-Net's preprocessing for the planned configurations, which
is the same as ``nnUNetv2_preprocess -d ID -plans_name <plans name> -c <configurations>``.
"""
from __future__ import annotations

import json
import os


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan (and optionally preprocess) a dataset for a method's planner",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name (DatasetXXX_Name)")
    p.add_argument("-m", "--method", required=True, help="method whose planner to use (see `nnunet-plugins list`)")
    p.add_argument("--plans-name", default=None, help="plans identifier to write (default: the planner's own)")
    p.add_argument("--gpu-memory-target", type=float, default=8.0, help="GPU memory target in GB (default 8)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None, help="fix the patch size (rounded as the method needs)")
    p.add_argument("--batch-size", type=int, default=None, help="fix the batch size")
    p.add_argument("--arch-kwargs", default=None,
                   help='JSON object of network constructor arguments written into the plans, e.g. '
                        '\'{"stage_channels": [16, 32, 64, 64]}\'')
    p.add_argument("--overwrite-target-spacing", type=float, nargs="+", default=None)
    p.add_argument("--preprocess", action="store_true", help="also run nnU-Net's preprocessing")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="processes for fingerprint/preprocessing")
    p.add_argument("--verify-dataset-integrity", action="store_true")
    p.set_defaults(func=run)


def plan_dataset(dataset: str | int, method: str, *, plans_name: str | None = None,
                 gpu_memory_target: float = 8.0, patch_size=None, batch_size: int | None = None,
                 arch_kwargs: dict | None = None, overwrite_target_spacing=None, preprocess: bool = False,
                 num_processes: int = 2, verify_dataset_integrity: bool = False) -> tuple[dict, str]:
    """Plan ``dataset`` with ``method``'s planner; return (plans, plans identifier)."""
    from os.path import isfile, join

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess as nn_preprocess
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_plugins.registry import find_method, resolve

    m = find_method(method)
    if not m.planners:
        raise ValueError(f"method {m.name} has no planner of its own; use nnU-Net's plans "
                         f"(nnUNetv2_plan_and_preprocess)")
    planner_class = resolve(m.planners[0])
    dataset_name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    dataset_id = int(dataset_name[7:10])
    if verify_dataset_integrity or not isfile(join(nnUNet_preprocessed, dataset_name, "dataset_fingerprint.json")):
        extract_fingerprints([dataset_id], num_processes=num_processes,
                             check_dataset_integrity=verify_dataset_integrity)
    kwargs = {"gpu_memory_target_in_gb": gpu_memory_target}
    if plans_name:
        kwargs["plans_name"] = plans_name
    if overwrite_target_spacing is not None:
        kwargs["overwrite_target_spacing"] = [float(s) for s in overwrite_target_spacing]
    if os.environ.get("nnUNet_n_proc_DA", "").strip() == "0":
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA) for its memory estimate and
        # crashes on 0, the value that makes CPU training fastest; planning does not need augmentation
        # workers, so plan with 1
        os.environ["nnUNet_n_proc_DA"] = "1"
    planner = planner_class(dataset_id, **kwargs)
    if patch_size is not None:
        planner.patch_size_override = list(patch_size)
    if batch_size is not None:
        planner.batch_size_override = int(batch_size)
    if arch_kwargs:
        planner.arch_kwargs_override = dict(arch_kwargs)
    plans = planner.plan_experiment()
    # save_plans may have dropped configurations the method cannot use: report what was written
    with open(join(nnUNet_preprocessed, dataset_name, planner.plans_identifier + ".json")) as f:
        plans = json.load(f)
    if preprocess:
        configurations = list(plans["configurations"])
        nn_preprocess([dataset_id], planner.plans_identifier, configurations, [num_processes] * len(configurations))
    return plans, planner.plans_identifier


def run(args) -> int:
    from nnunet_plugins.commands import arch_kwargs_option

    arch_kwargs = arch_kwargs_option(args.arch_kwargs)
    plans, identifier = plan_dataset(args.dataset, args.method, plans_name=args.plans_name,
                                     gpu_memory_target=args.gpu_memory_target, patch_size=args.patch_size,
                                     batch_size=args.batch_size, arch_kwargs=arch_kwargs,
                                     overwrite_target_spacing=args.overwrite_target_spacing,
                                     preprocess=args.preprocess, num_processes=args.num_processes,
                                     verify_dataset_integrity=args.verify_dataset_integrity)
    from nnunet_plugins.registry import find_method

    trainer = find_method(args.method).trainers[0].rpartition(".")[2]
    configurations = " ".join(plans["configurations"])
    for name, cfg in plans["configurations"].items():
        print(f"{identifier} / {name}: patch {cfg.get('patch_size')}, batch {cfg.get('batch_size')}, "
              f"spacing {cfg.get('spacing')}")
    ds = plans["dataset_name"]
    if not args.preprocess:
        print(f"next: nnUNetv2_preprocess -d {ds[7:10]} -plans_name {identifier} -c {configurations}")
    first = next(iter(plans["configurations"]))
    print(f"then: nnUNetv2_train {ds[7:10]} {first} FOLD -tr {trainer} -p {identifier}")
    return 0

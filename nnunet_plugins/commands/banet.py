"""``nnunet-plugins banet``: BA-Net protocol tools.

* ``nnunet-plugins banet split -d DATASET``: write the official KiPA22 cross-validation split
  (``KFold(4, shuffle=True, random_state=12345)`` on the sorted case identifiers, as the official
  ``nnUNetTrainerV2_4Fold``) as ``$nnUNet_preprocessed/DatasetXXX/splits_final.json``; nnU-Net then
  trains folds 0-3 on it. Without this file nnU-Net makes its default 5-fold split.
* ``nnunet-plugins banet convert -i model_final_checkpoint.model -o banet.pth``: convert an official
  BA-Net checkpoint (nnU-Net v1) into our network's state dict (``BANetPlainConvUNet`` with
  ``official_v1_layout``); fails with the names of the tensors that do not fit.
  (``nnunet-plugins convert-checkpoint banet`` writes a complete nnU-Net model folder from it instead.)
"""
from __future__ import annotations

import json
import os


def add_parser(subparsers) -> None:
    import argparse

    p = subparsers.add_parser("banet", help="BA-Net tools: official 4-fold KiPA split, official checkpoint conversion",
                              description=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="banet_command", metavar="SUBCOMMAND")
    sub.required = True

    s = sub.add_parser("split", help="write the official KiPA22 4-fold split as splits_final.json")
    s.add_argument("-d", "--dataset", required=True, help="dataset ID or name (DatasetXXX_Name)")
    s.add_argument("--folds", type=int, default=4, help="number of folds (official KiPA22: 4)")
    s.add_argument("--seed", type=int, default=12345, help="KFold random_state (official: 12345)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing, different splits_final.json")
    s.set_defaults(func=run_split)

    c = sub.add_parser("convert", help="convert an official BA-Net checkpoint (nnU-Net v1 .model) to our network")
    c.add_argument("-i", "--input", required=True, help="official checkpoint, e.g. model_final_checkpoint.model")
    c.add_argument("-o", "--output", required=True, help="output .pth (network_weights + plans architecture entry)")
    c.add_argument("--plans", default=None, help="optional nnU-Net v2 plans.json whose configuration must fit")
    c.add_argument("-c", "--configuration", default="3d_fullres", help="configuration in --plans (default 3d_fullres)")
    c.add_argument("--allow-pickle", action="store_true",
                   help="load the checkpoint with full unpickling (only for files you trust)")
    c.set_defaults(func=run_convert)


def dataset_case_identifiers(dataset_name: str) -> list[str]:
    """Sorted training case identifiers: from the preprocessed ground truth, else from the raw dataset."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    for root, sub in ((nnUNet_preprocessed, "gt_segmentations"), (nnUNet_raw, "labelsTr")):
        if not root:
            continue
        folder = os.path.join(root, dataset_name)
        dataset_json = os.path.join(folder, "dataset.json")
        labels = os.path.join(folder, sub)
        if os.path.isfile(dataset_json) and os.path.isdir(labels):
            with open(dataset_json) as f:
                ending = json.load(f)["file_ending"]
            ids = sorted(n[: -len(ending)] for n in os.listdir(labels) if n.endswith(ending))
            if ids:
                return ids
    raise FileNotFoundError(f"no training cases found for {dataset_name}: neither "
                            f"$nnUNet_preprocessed/{dataset_name}/gt_segmentations nor "
                            f"$nnUNet_raw/{dataset_name}/labelsTr has label files")


def write_split(dataset, folds: int = 4, seed: int = 12345, overwrite: bool = False) -> str:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_plugins.atomic import write_json
    from nnunet_plugins.training.crossval import kfold_split

    if not nnUNet_preprocessed:
        raise RuntimeError("nnUNet_preprocessed is not set")
    name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    splits = kfold_split(dataset_case_identifiers(name), folds, seed)
    folder = os.path.join(nnUNet_preprocessed, name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "splits_final.json")
    if os.path.isfile(path) and not overwrite:
        with open(path) as f:
            existing = json.load(f)
        if existing != splits:
            raise FileExistsError(f"{path} exists with a different split; pass --overwrite to replace it")
        return path
    write_json(splits, path, indent=4)
    return path


def run_split(args) -> int:
    try:
        path = write_split(args.dataset, args.folds, args.seed, args.overwrite)
    except FileExistsError as e:
        raise ValueError(str(e)) from e
    with open(path) as f:
        splits = json.load(f)
    print(f"wrote {path}: {len(splits)} folds, validation cases per fold "
          f"{[len(s['val']) for s in splits]}")
    return 0


def run_convert(args) -> int:
    from nnunet_plugins.checkpoints.banet import convert_official_checkpoint

    expected = None
    if args.plans:
        expected = plans_configuration_architecture(args.plans, args.configuration)
    content = convert_official_checkpoint(args.input, args.output, allow_pickle=args.allow_pickle,
                                          expected_architecture=expected)
    print(f"wrote {args.output}: {len(content['network_weights'])} tensors, {content['input_channels']} input "
          f"channel(s), {content['num_classes']} classes")
    print("plans architecture entry for this network (use it in a plans configuration to train/predict with it):")
    print(json.dumps(content["architecture"], indent=2))
    return 0


def plans_configuration_architecture(plans_file: str, configuration: str) -> dict:
    """The BA-Net architecture (official v1 layout) that BANetTrainer would build for a plans configuration."""
    from nnunet_plugins.architectures.banet import BANET_PLAIN, banet_network_class

    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"plans file not found: {plans_file}")
    with open(plans_file) as f:
        plans = json.load(f)
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise KeyError(f"{plans_file} has no configuration {configuration!r} (has {', '.join(configurations)})")
    cfg = configurations[configuration]
    while "architecture" not in cfg and "inherits_from" in cfg:  # nnU-Net's configuration inheritance
        cfg = {**configurations[cfg["inherits_from"]], **{k: v for k, v in cfg.items() if k != "inherits_from"}}
    architecture = dict(cfg["architecture"])
    architecture["network_class_name"] = banet_network_class(architecture["network_class_name"])
    if architecture["network_class_name"] != BANET_PLAIN:
        raise ValueError(f"the official BA-Net is a plain U-Net; {plans_file} configuration {configuration!r} "
                         f"uses {architecture['network_class_name']}")
    architecture["arch_kwargs"] = {**architecture["arch_kwargs"], "official_v1_layout": True}
    return architecture

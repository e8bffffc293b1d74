"""``nnunet-plugins check-input``: verify a prediction input folder against a trained model or a raw dataset
before a long prediction (channel count and naming, the reader nnU-Net will use, complete decoding of every file,
geometry between the channels of each case).

    nnunet-plugins check-input -d 135 -i FOLDER [-tr nnUNetTrainer -p nnUNetPlans -c 3d_fullres] [-np N]
"""
from __future__ import annotations

import os

from nnunet_plugins.commands.challenges import EXIT_CODES, guarded
from nnunet_plugins.dataset_conversion.common import ChallengeError, default_num_processes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check-input", help="verify a prediction input folder against a trained model (channels, readers, geometry)",
        description="Check a folder of images for nnUNetv2_predict against a trained model (nnUNet_results/"
                    "DatasetXXX/TRAINER__PLANS__CONFIG) or, if it is not trained yet, the raw dataset: files named "
                    "<case>_<XXXX><file ending> with exactly the model's channels, a reader nnU-Net can use, every "
                    "file decoding completely (stock nnU-Net reads a truncated .nii.gz as zeros), the same geometry "
                    "for all channels of a case. Prints a summary; errors name the case and file.",
        epilog=EXIT_CODES)
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    p.add_argument("-i", "--input", required=True, help="the folder to check")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("--task", default=None, help="multi-task models: raw images of this source task (tag or id)")
    p.add_argument("-np", "--num-processes", type=int, default=default_num_processes(),
                   help=f"parallel processes (default {default_num_processes()}: $nnUNet_def_n_proc)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=guarded("check-input")(run))


def model_or_dataset_folder(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """The trained model's folder if it exists, else the raw dataset's folder (both hold dataset.json)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except Exception as e:
        raise ChallengeError(f"dataset {dataset} not found in $nnUNet_raw, $nnUNet_preprocessed or $nnUNet_results "
                             f"({str(e).strip().splitlines()[0][:150]})") from None
    results = os.environ.get("nnUNet_results")
    if results:
        model = os.path.join(results, name, f"{trainer}__{plans}__{configuration}")
        if os.path.isfile(os.path.join(model, "dataset.json")):
            return model
    raw = os.environ.get("nnUNet_raw")
    if raw and os.path.isfile(os.path.join(raw, name, "dataset.json")):
        return os.path.join(raw, name)
    raise ChallengeError(f"no trained model {trainer}__{plans}__{configuration} of {name} in $nnUNet_results and no "
                         f"raw dataset {name} in $nnUNet_raw")


def run(args) -> int:
    from nnunet_plugins.dataset_conversion.input_check import check_model_inputs

    folder = model_or_dataset_folder(args.dataset, args.trainer, args.plans, args.configuration)
    result = check_model_inputs(folder, args.input, args.task, num_processes=args.num_processes,
                                progress=args.progress)
    print(f"{args.input}: {len(result['cases'])} case(s) with {result['num_channels']} channel(s) each "
          f"(*{result['file_ending']}, checked against {folder}); reader {result['reader']}; every file decodes "
          "completely; the channels of each case share their geometry")
    return 0

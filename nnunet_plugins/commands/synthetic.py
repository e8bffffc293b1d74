"""``nnunet-plugins synth``: write a synthetic dataset in nnU-Net raw format."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    from nnunet_plugins.synthetic import SyntheticSpec

    d = SyntheticSpec()
    p = subparsers.add_parser(
        "synth", help="generate a synthetic 3-D dataset in nnU-Net raw format",
        description="Generate a learnable synthetic 3-D dataset (several structures of different shapes "
                    "and intensities, anisotropic spacing, oblique direction, noise) as "
                    "$nnUNet_raw/DatasetXXX_Name. A rerun with the same parameters does nothing.")
    p.add_argument("-d", "--dataset-id", type=int, default=d.dataset_id, help=f"dataset ID (default {d.dataset_id})")
    p.add_argument("--name", default=d.name, help=f"dataset name (default {d.name})")
    p.add_argument("--cases", type=int, default=d.num_cases, help=f"training cases (default {d.num_cases})")
    p.add_argument("--test-cases", type=int, default=d.num_test,
                   help=f"test cases written to imagesTs/labelsTs (default {d.num_test})")
    p.add_argument("--unlabeled", type=int, default=d.num_unlabeled,
                   help="unlabeled images written to imagesUn, for semi-supervised training (default "
                        f"{d.num_unlabeled})")
    p.add_argument("--shape", type=int, nargs=3, default=list(d.shape), metavar=("Z", "Y", "X"),
                   help=f"volume size in voxels (default {' '.join(map(str, d.shape))})")
    p.add_argument("--spacing", type=float, nargs=3, default=list(d.spacing), metavar=("Z", "Y", "X"),
                   help=f"voxel spacing in mm (default {' '.join(map(str, d.spacing))})")
    p.add_argument("--structures", type=int, default=d.num_structures,
                   help=f"foreground structures = labels (default {d.num_structures})")
    p.add_argument("--channels", type=int, default=d.num_channels, help=f"input channels (default {d.num_channels})")
    p.add_argument("--noise", type=float, default=d.noise_std, help=f"noise standard deviation (default {d.noise_std})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with other parameters")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_plugins.synthetic import generate_dataset

    folder = generate_dataset(args.raw, overwrite=args.overwrite, dataset_id=args.dataset_id, name=args.name,
                              num_cases=args.cases, num_test=args.test_cases, shape=tuple(args.shape),
                              spacing=tuple(args.spacing), num_structures=args.structures,
                              num_channels=args.channels, noise_std=args.noise, seed=args.seed,
                              num_unlabeled=args.unlabeled)
    print(folder)
    return 0

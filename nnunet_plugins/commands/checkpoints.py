"""``nnunet-plugins convert-checkpoint METHOD -i OFFICIAL -d DATASET -c CONFIG [-p PLANS] [-f FOLD]``: an official
checkpoint -> a complete nnU-Net model folder (``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG/fold_F``).

Methods and the trainer each folder is for: banet (BANetTrainer), cotr (CoTrTrainer) - predict with
``nnUNetv2_predict -tr TRAINER``; uniseg (UniSegTrainer), dodnet (DoDNetTrainer), transdodnet
(TransDoDNetTrainer) - multi-task: the dataset must be a combined one (``nnunet-plugins combine``) with
the checkpoint's tasks, and prediction runs through ``nnunet-plugins predict-multitask``. The dataset
must be planned and preprocessed by nnU-Net first; its plans give spacing, normalisation and patch, the
checkpoint gives the network (see ``nnunet_plugins.checkpoints.model_folder``).
"""
from __future__ import annotations



def add_parser(subparsers) -> None:
    import argparse

    from nnunet_plugins.checkpoints import TRAINERS

    p = subparsers.add_parser("convert-checkpoint", help="official checkpoint -> nnU-Net model folder",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=sorted(TRAINERS))
    p.add_argument("-i", "--input", required=True, help="official checkpoint file")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name (planned and preprocessed by nnU-Net)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", "--fold", default="0", help="fold folder to write (default 0; 'all' allowed)")
    p.add_argument("--arch-kwargs", default=None, metavar="JSON",
                   help="network constructor arguments over the official configuration (e.g. a narrower network)")
    p.add_argument("--allow-pickle", action="store_true", help="full unpickling of the checkpoint (trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing fold checkpoint / other plans")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_plugins.checkpoints import MULTITASK, TRAINERS
    from nnunet_plugins.checkpoints.model_folder import write_model_folder

    from nnunet_plugins.commands import arch_kwargs_option

    arch_kwargs = arch_kwargs_option(args.arch_kwargs)
    model = write_model_folder(args.method, args.input, args.dataset, args.configuration, args.plans, args.fold,
                               arch_kwargs, args.allow_pickle, args.overwrite)
    print(f"wrote {model}/fold_{args.fold}/checkpoint_final.pth")
    where = f"-d {args.dataset} -c {args.configuration} -p {args.plans} -f {args.fold} -tr {TRAINERS[args.method]}"
    if args.method in MULTITASK:
        print(f"predict: nnunet-plugins predict-multitask -i IMAGES -o OUT {where}")
    else:
        print(f"predict: nnUNetv2_predict -i IMAGES -o OUT {where}")
    return 0

"""``nnunet-plugins demo``: CoTr trained and evaluated on a synthetic dataset through nnU-Net's commands."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo (synthetic data, CoTr, CPU)",
                              description="Generate a synthetic dataset, plan and preprocess it for CoTr, train "
                                          "CoTrTrainer on CPU through nnUNetv2_train, predict held-out cases "
                                          "with nnUNetv2_predict and report Dice.")
    p.add_argument("--workdir", default="nnunet_plugins_work",
                   help="folder for nnUNet_raw/_preprocessed/_results of the demo (default ./nnunet_plugins_work)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    p.add_argument("--cases", type=int, default=10, help="training cases of the synthetic dataset")
    p.add_argument("--full-width", action="store_true", help="official CoTr widths (slow on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_plugins.demo import run_demo

    run_demo(args.workdir, epochs=args.epochs, iterations=args.iterations, num_cases=args.cases,
             full_width=args.full_width, seed=args.seed)
    return 0

"""``nnunet-plugins metrics``: the semi-supervised papers' Dice, Jaccard, HD95 and ASD for a prediction folder."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "metrics", help="Dice, Jaccard, HD95 and ASD (mm) of a prediction folder",
        description="Score every segmentation of PRED against the file of the same name in GT with the metrics "
                    "the semi-supervised papers report (medpy's dc, jc, hd95, asd(pred, gt)), per case and label, "
                    "and their means. Both empty: Dice 1, HD95/ASD 0; one empty: Dice 0, HD95/ASD undefined "
                    "(left out of the means and counted).")
    p.add_argument("pred", help="prediction folder (e.g. nnUNetv2_predict's output)")
    p.add_argument("gt", help="reference folder (e.g. labelsTr or labelsTs)")
    p.add_argument("-o", "--output", default=None, help="JSON file to write (default PRED/protocol_metrics.json)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="label values to score, a comma-joined list scores their union (default: every non-zero "
                        "value found)")
    p.add_argument("--file-ending", default=None, help="file ending (default: found in GT, e.g. .nii.gz)")
    p.add_argument("-np", "--num-processes", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_plugins.evaluation.protocol import evaluate_folder

    result = evaluate_folder(args.pred, args.gt, output=args.output, labels=args.labels, file_ending=args.file_ending,
                             num_processes=args.num_processes, progress=not args.no_progress)
    print(result["text"])
    print(f"written: {result['output']}")
    return 0

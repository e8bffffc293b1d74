"""Challenge commands: ``convert``, ``export``, ``evaluate``, ``synth-release`` and ``challenge-infer``.

    nnunet-plugins convert  CHALLENGE RELEASE_DIR [-d ID] [--task T] ...   release -> nnUNet_raw/DatasetXXX_Name
    nnunet-plugins export   CHALLENGE PRED_DIR OUT_DIR --images REF ...   nnU-Net predictions -> submission
    nnunet-plugins evaluate CHALLENGE PRED GT ...                          official metrics, tables, summary
    nnunet-plugins synth-release CHALLENGE OUT_DIR [--cases N] ...         small synthetic release
    nnunet-plugins challenge-infer CHALLENGE --model MODEL [--input /input] [--output /output]

Each challenge declares its Python entry points and the options it adds to each sub-command in its module's
``SPEC`` (:class:`nnunet_plugins.dataset_conversion.common.Challenge`); this module builds one sub-parser per
challenge and sub-command from that table (``nnunet-plugins convert kits21 --help`` lists KiTS21's options only)
and adds the options every challenge shares.

Exit codes of every command here: 0 success; 2 an error in the input or the options (one line naming the case, file
or folder, no traceback); 130 interrupted (Ctrl-C, one line); anything else is a bug (a traceback; please report).
"""
from __future__ import annotations

import functools
import sys

from nnunet_plugins.dataset_conversion.common import ChallengeError, Option, default_num_processes

INTERRUPTED = 130


def _shared(command: str) -> tuple:
    """Options of ``command`` that every challenge takes (None = the challenge's own default)."""
    parallel = (Option(("-np", "--num-processes"), "num_processes",
                       f"parallel processes (default {default_num_processes()}: $nnUNet_def_n_proc, else nnU-Net's "
                       "default, as every nnU-Net command)", default=default_num_processes(), type=int, metavar="N"),
                Option(("--no-progress",), "progress", "no progress bar", flag=True, to_param=lambda v: not v))
    extra = Option(("--allow-extra",), "allow_extra", "ignore (with a note) predictions that match no "
                   f"{'input image' if command == 'export' else 'reference case'} instead of failing", flag=True)
    tolerance = Option(("--tolerance",), "tolerance", "largest allowed geometry difference (mm / direction cosine; "
                       "default 1e-4)", type=float)
    return {
        "convert": (Option(("--name",), "name", "dataset name (default per challenge)"),
                    Option(("--raw",), "raw", "nnU-Net raw folder (default $nnUNet_raw)"),
                    tolerance,
                    Option(("--overwrite",), "overwrite", "delete an existing or partial dataset and start clean",
                           flag=True)) + parallel,
        "export": (Option(("--images",), "images", "the input images the predictions belong to (expected cases and "
                          "geometry): the release's test/validation images, nnU-Net's imagesTs, or the "
                          "grand-challenge /input folder", required=True),
                   tolerance, extra) + parallel,
        "evaluate": (Option(("-o", "--output"), "out_dir", "folder for the tables (default: the prediction folder)",
                            metavar="OUT"),
                     Option(("--missing",), "missing", "reference cases without a prediction: error (default; the "
                            "challenges score them as worst), empty (score them as empty predictions) or skip (leave "
                            "them out, e.g. for one cross-validation fold; listed)", default="error",
                            choices=("error", "empty", "skip")),
                     extra) + parallel,
    }[command]


POSITIONALS = {
    "convert": (("release_dir", "the release folder as the organisers ship it"),),
    "export": (("pred_dir", "nnU-Net prediction folder"), ("out_dir", "output folder")),
    "evaluate": (("pred", "predictions (folder; amos22/segrap2023 also their submission zip)"),
                 ("gt", "reference: the release (or its label folder)")),
}
DESCRIPTIONS = {
    "convert": ("convert a challenge release into an nnU-Net raw dataset",
                "Convert the release folder of a challenge, exactly as the organisers ship it, into "
                "$nnUNet_raw/DatasetXXX_Name (imagesTr, labelsTr, imagesTs, dataset.json). Every file is read once and "
                "fully decoded. The dataset is built in a hidden .partial folder and renamed when complete; a rerun "
                "resumes, reconverts cases whose source files changed, --overwrite starts clean."),
    "export": ("turn nnU-Net predictions into a challenge submission",
               "Convert an nnU-Net prediction folder into the challenge's submission format: original label values, "
               "file names and layout, the input images' exact geometry, and an archive where the challenge takes "
               "one. Every case of --images must have a prediction; a prediction that matches no input image is an "
               "error unless --allow-extra."),
    "evaluate": ("score predictions with a challenge's official metrics",
                 "Compute the challenge's official metrics with its rules; writes per-case and summary tables (CSV "
                 "and JSON) and prints the summary. Every reference case must have a prediction (--missing), the "
                 "prediction's geometry must be the reference's (as export checks it)."),
}
EXIT_CODES = "exit codes: 0 success, 2 bad input or options (one line), 130 interrupted"


def guarded(command: str):
    """Run a command handler so that Ctrl-C prints one line (exit 130) and an unwritable or invalid path is one
    line naming it (exit 2, through ``nnunet-plugins``' error handling) instead of a traceback."""
    def wrap(func):
        @functools.wraps(func)
        def run(args):
            try:
                return func(args)
            except KeyboardInterrupt:
                print(f"nnunet-plugins {command}: interrupted", file=sys.stderr)
                raise SystemExit(INTERRUPTED) from None
            except OSError as e:
                if isinstance(e, FileNotFoundError) and not e.filename:
                    raise
                if e.filename:
                    raise ChallengeError(f"cannot use {e.filename}: {e.strerror or e}") from None
                raise ChallengeError(f"input/output error: {e.strerror or e}") from None
        return run
    return wrap


def add_parser(subparsers) -> None:
    from nnunet_plugins.dataset_conversion import challenges

    table = challenges()
    for command, (short, description) in DESCRIPTIONS.items():
        p = subparsers.add_parser(command, help=short, description=description, epilog=EXIT_CODES)
        per_challenge = p.add_subparsers(dest="challenge", metavar="CHALLENGE",
                                         title=f"challenges ({', '.join(table)})")
        per_challenge.required = True
        for spec in table.values():
            c = per_challenge.add_parser(spec.name, help=f"{spec.title}: {short}", description=description,
                                         epilog=EXIT_CODES)
            for name, help_text in POSITIONALS[command]:
                c.add_argument(name, help=help_text)
            if command == "convert":
                c.add_argument("-d", "--dataset-id", dest="dataset_id", type=int, default=None,
                               help=f"nnU-Net dataset ID (default {spec.default_dataset})")
            for option in _shared(command) + spec.options(command):
                option.add_to(c)
        p.set_defaults(func=guarded(command)(functools.partial(run_command, command)))

    p = subparsers.add_parser(
        "synth-release", help="write a small synthetic release in a challenge's exact layout",
        description="Write a tiny synthetic release of a challenge (names, folders, channels, label values, "
                    "geometry conventions) for tests, demos and benchmarks.", epilog=EXIT_CODES)
    p.add_argument("challenge", choices=tuple(table))
    p.add_argument("out_dir", help="folder to write the release to (must be empty or absent)")
    p.add_argument("--cases", type=int, default=None,
                   help="training cases (default: kits21 3, amos22 5, segrap2023 2, myops2020 3, kipa22 3)")
    p.add_argument("--test-cases", type=int, default=None,
                   help="test/validation images without labels (default: amos22 2, segrap2023 0, myops2020 1, "
                        "kipa22 1; kits21 releases have none)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="volume size in voxels, array order (default: 16 32 32; myops2020 4 32 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=guarded("synth-release")(run_synth))

    from nnunet_plugins.dataset_conversion.container import add_arguments
    p = subparsers.add_parser(
        "challenge-infer", help="container inference entry point (grand-challenge input/output layout)",
        description="Read the organisers' input folder layout, check every input (channels, complete decoding, "
                    "geometry between channels), predict with a trained nnU-Net model and write their output layout "
                    "(kits21, segrap2023, amos22 test phase).", epilog=EXIT_CODES)
    add_arguments(p)
    p.set_defaults(func=guarded("challenge-infer")(run_infer))


def _keywords(options, args, drop_none: bool) -> dict:
    values = {o.param: o.value(args) for o in options}
    return {k: v for k, v in values.items() if v is not None} if drop_none else values


def run_command(command: str, args) -> int:
    """``convert`` / ``export`` / ``evaluate`` of ``args.challenge``: its table entry's function with the shared and
    the challenge's own options."""
    from nnunet_plugins.dataset_conversion import challenges

    spec = challenges()[args.challenge]
    kwargs = _keywords(_shared(command), args, drop_none=True)
    if command == "convert" and args.dataset_id is not None:
        kwargs["dataset_id"] = args.dataset_id
    kwargs.update(_keywords(spec.options(command), args, drop_none=False))
    result = getattr(spec, command)(*(getattr(args, name) for name, _ in POSITIONALS[command]), **kwargs)
    if command == "convert":
        print(result)
    elif command == "export":
        files = result["files"] if isinstance(result, dict) else result
        print(f"wrote {len(files)} files to {args.out_dir}")
        if isinstance(result, dict) and result.get("archive"):
            print(f"archive: {result['archive']}")
    return 0


def run_synth(args) -> int:
    from nnunet_plugins.dataset_conversion.synthetic_releases import generate
    print(generate(args.challenge, args.out_dir, seed=args.seed, overwrite=args.overwrite, cases=args.cases,
                   test_cases=args.test_cases, shape=tuple(args.shape) if args.shape else None))
    return 0


def run_infer(args) -> int:
    from nnunet_plugins.dataset_conversion.container import run_from_args
    return run_from_args(args)

"""The ``nnunet-plugins`` command (also ``python -m nnunet_plugins``).

Each sub-command lives in its own module under ``nnunet_plugins.commands`` and exposes
``add_parser(subparsers)``, which registers the sub-command and sets ``func`` on its parser. Heavy
imports (torch, nnU-Net) happen inside the handlers, so ``nnunet-plugins --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "nnunet_plugins.commands.listing",
    "nnunet_plugins.commands.synthetic",
    "nnunet_plugins.commands.plan",
    "nnunet_plugins.commands.demo",
    "nnunet_plugins.commands.challenges",
    "nnunet_plugins.commands.check_input",
    "nnunet_plugins.commands.multitask",
    "nnunet_plugins.commands.uniseg",
    "nnunet_plugins.commands.banet",
    "nnunet_plugins.commands.metrics",
    "nnunet_plugins.commands.semi",
    "nnunet_plugins.commands.checkpoints",
    "nnunet_plugins.commands.medseqft",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-plugins",
        description="Research segmentation methods and challenge tooling as plugins for nnU-Net v2.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (innermost) sub-command that ``args`` selected, e.g. that of ``convert kipa22``."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, actions[0].dest, None) if actions else None
        if chosen not in (actions[0].choices if actions else {}):
            return parser
        parser = actions[0].choices[chosen]


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse reports unknown options from the top-level parser ("nnunet-plugins: error: ..."); report them from
        # the sub-command's parser, with its usage, as its other errors ("nnunet-plugins convert kipa22: error: ...")
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        # user errors (bad arguments, missing files) are reported as one clear line, not a traceback
        parser.exit(2, f"nnunet-plugins {args.command}: error: {e}\n")
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

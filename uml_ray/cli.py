"""The ``uml-ray`` entry point: ``main(argv)`` builds the command tree and maps user errors to exit 2.

Each package contributes its subcommands through a ``register(subparsers)`` function in its own
``commands`` module, so a command lives beside the code it drives.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from uml_ray.errors import TrialCrash, UserError
from uml_ray.uri import check_output_folder, redact_text

COMMAND_MODULES = (
    "uml_ray.driver.commands",
    "uml_ray.driver.best",
    "uml_ray.data.commands",
    "uml_ray.encoders.commands",
    "uml_ray.science.commands",
)


def build_parser() -> argparse.ArgumentParser:
    """The full ``uml-ray`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="uml-ray",
        description="Train and tune Unpaired Multimodal Learners on Ray, tracked in MLflow.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``uml-ray`` command; returns the exit code: 2 for user errors (bad config or data),
    1 when a trial crashed (its traceback saved and pointed to)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        # every command that writes a dataset names its folder OUT (``out_dir``) or ``--out``
        check_output_folder(getattr(args, "out_dir", None), "OUT")
        check_output_folder(getattr(args, "out", None), "--out")
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug or os.environ.get("UML_RAY_DEBUG"):
            traceback.print_exc()
        print(f"uml-ray {args.command}: error: {redact_text(exc)}", file=sys.stderr)
        return 2
    except TrialCrash as exc:
        print(f"uml-ray {args.command}: trial crashed: {redact_text(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

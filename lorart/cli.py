"""The ``lorart`` command: a small dispatcher over the modules in ``lorart.commands``.

Each module of ``lorart/commands/`` is a subcommand (``lorart demo``, ``lorart train``,
``lorart bench``...). A module provides ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``. Modules are found at run time, so adding a subcommand is
adding a file; heavy imports (torch, transformers) belong inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


def _subcommand_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorart", description="lorart: compiled-kernel LoRA runtime for PyTorch")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lorart {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _subcommand_modules():
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorart`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

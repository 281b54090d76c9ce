"""The ``lorart`` command: a small dispatcher over the modules in ``lorart.commands``.

Each subcommand is one module of ``lorart/commands/`` listed in :data:`SUBCOMMANDS`; it
provides ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Heavy
imports (torch, transformers) belong inside ``run``, after the arguments are checked.

Errors: a subcommand raises :class:`UserError` for a mistake in what the user typed or
installed (a missing file, a bad flag value, a backend this machine lacks). ``main``
prints it as ONE line, ``lorart <command>: error: ...``, and returns exit status 2;
``--debug`` (or ``LORART_DEBUG=1``) shows the traceback instead. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# One line per subcommand (a module of lorart.commands), in the order `lorart --help` lists.
SUBCOMMANDS = [
    "demo",
    "train",
    "bench",
    "serve",
]


class UserError(Exception):
    """A mistake in the command line or the environment: reported in one line, exit 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (usage examples) and appends each option's
    default to its help, unless the help already says it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == argparse.SUPPRESS
        if "default" in text or nothing or not action.option_strings:
            return text
        if isinstance(default, list | tuple):
            default = ",".join(map(str, default))
        return f"{text} (default: {default})"


def add_subcommand(sub, module) -> argparse.ArgumentParser:
    """The parser of one subcommand module, with the options every subcommand has."""
    cmd = sub.add_parser(module.NAME, help=module.HELP, formatter_class=HelpFormatter,
                         description=_description(module))
    module.add_arguments(cmd)
    cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="show the full traceback of an error")
    cmd.set_defaults(_run=module.run)
    return cmd


def _description(module) -> str:
    """The module's docstring (its usage examples) when it has one, else its HELP."""
    return (module.__doc__ or module.HELP).strip()


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lorart", description="lorart: compiled-kernel LoRA runtime for PyTorch",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"lorart {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks of errors (also LORART_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        add_subcommand(sub, importlib.import_module(f"{__package__}.commands.{name}"))
    return parser


def run_command(prog: str, run, args: argparse.Namespace) -> int:
    """``run(args)``, with a :class:`UserError` turned into one line on stderr and exit 2."""
    debug = getattr(args, "debug", False) or os.environ.get("LORART_DEBUG", "") not in ("", "0")
    try:
        return int(run(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorart`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return run_command(f"lorart {args.command}", args._run, args)


def standalone(module, argv: list[str] | None = None) -> int:
    """``python -m lorart.commands.<name>``: the subcommand alone, same checks and errors."""
    parser = argparse.ArgumentParser(prog=f"lorart {module.NAME}", formatter_class=HelpFormatter,
                                     description=_description(module))
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return run_command(parser.prog, module.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

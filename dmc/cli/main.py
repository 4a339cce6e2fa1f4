"""Entry point of the ``dmc`` command.

Each subcommand lives in its own module of this package exposing ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

SUBCOMMANDS = ("retrofit", "import_megatron", "import_gguf", "gqa", "eval", "generate", "bench", "study", "serve")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a default worth showing (not None,
    not a store_true's False) and the help does not mention its default already. A subcommand
    module opts in with ``HELP_DEFAULTS = True``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if ("%(default)" in help or "default" in help.lower() or not action.option_strings
                or default is None or default is argparse.SUPPRESS or default is False or default == []):
            return help
        return f"{help} (default: %(default)s)" if help else "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmc", description="Dynamic Memory Compression for Hugging Face LLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"dmc.cli.{name}")
        formatter = DefaultsHelpFormatter if getattr(module, "HELP_DEFAULTS", False) else argparse.HelpFormatter
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP, formatter_class=formatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one "warning: ..." line, without the source line Python prints under it (the
    command's user did not write that code); another library's warnings keep their category."""
    origin = "" if category.__module__.startswith("dmc") or category is UserWarning else f" ({category.__name__})"
    return f"warning: {message}{origin}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())

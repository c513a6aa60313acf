"""`cutfl`: the parser and the error handling every command shares.

Every error a user can cause (a bad flag, a missing file, an unknown task) ends the command with one
readable line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cutfl import deploy_commands, export_commands, model_commands, prune_commands, simulate_command
from cutfl.args import CliError, Parser

EXIT_ERROR = 1
COMMAND_GROUPS = (model_commands, prune_commands, export_commands, simulate_command, deploy_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cutfl", description="cut-fl: personalised compact multi-task models for edge devices.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.add_commands(sub, Parser)
    for name, command in sub.choices.items():  # `cutfl X --help` opens with what X does, like `cutfl --help`
        if not command.description:
            summary = next((a.help for a in sub._choices_actions if a.dest == name), None)
            command.description = f"{summary[0].upper()}{summary[1:]}." if summary else None
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "out", "unset") is None and args.command == "pretrain":
        args.out = Path("runs") / f"pretrained-{args.dataset}"
    start = time.perf_counter()
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("cutfl: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            message = f"not found: {message}"
        print(f"cutfl {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    if args.command != "evaluate":
        print(f"cutfl {args.command}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""`hf-speft`: inspect, merge, compose, calibrate, plot and size SPEFT adapters from the shell.

Every command reports bad input as one line on stderr with exit code 2 (no traceback). Each command is one module
with `add_parser(commands)` and `run(args)`. This package sits beside `hf_speft`, not inside it: importing anything in
`hf_speft` runs its `__init__`, which loads torch, transformers and peft, so the parser (`--help`, argument errors)
imports none of it and each `run` imports the library itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from . import compose, estimate, inspect, merge, plot, salience
from .common import CliError

COMMANDS = (inspect, merge, compose, salience, plot, estimate)

EXAMPLES = """examples:
  hf-speft inspect out/adapter
  hf-speft inspect out/adapter --json
  hf-speft merge meta-llama/Meta-Llama-3-8B out/adapter merged/ --dtype bf16
  hf-speft compose out/math out/code --weights 0.7 0.3 --combination ties --density 0.5 --out out/both
  hf-speft salience ./my-base data/train.jsonl --measure gradient --density 0.005 --out out/mask
  hf-speft plot out/adapter --out mask.png
  hf-speft estimate meta-llama/Meta-Llama-3-8B --load_in_8bit --seq_len 1024 --batch_size 4
"""


class _ShowDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default (lists space-separated, as they are typed); options without one
    (None, or an off flag) say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


class _CommandParser(argparse.ArgumentParser):
    def __init__(self, **kwargs) -> None:
        super().__init__(formatter_class=_ShowDefaults, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-speft", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.run(args)
    except BrokenPipeError:  # e.g. `hf-speft inspect DIR | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (CliError, ValueError, OSError) as error:  # OSError: transformers' and the Hub's "cannot get this file"
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"hf-speft {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0

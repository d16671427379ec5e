"""`hf-speft`: inspect, merge, compose, calibrate, plot and size SPEFT adapters from the shell.

Every command reports bad input as one line on stderr with exit code 2 (no traceback). Each command is one module
with `add_parser(commands)` and `run(args)`; heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from ..hub import AdapterFolderError
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-speft", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.run(args)
    except (CliError, AdapterFolderError, ValueError, FileNotFoundError) as error:
        print(f"hf-speft {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `hf-speft inspect DIR | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())

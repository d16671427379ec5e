"""Command-line start-up: wall time of `hf-speft --help` and of an argument error, against `import hf_speft` (torch,
transformers and peft: what `--help` waited for when the parser lived inside `hf_speft`). Each is a fresh process,
median of `--repeats`. The commands run as `python -m hf_speft_cli`, the module the `hf-speft` script calls, on this
checkout.

    python benchmarks/cli_startup.py          # writes benchmarks/results/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 1.0  # issue 27: `--help` and argument errors answer within a second
COMMANDS = {
    "hf-speft --help": ([sys.executable, "-m", "hf_speft_cli", "--help"], 0),
    "hf-speft merge (argument error)": ([sys.executable, "-m", "hf_speft_cli", "merge"], 2),
    "python -c 'import hf_speft'": ([sys.executable, "-c", "import hf_speft"], 0),
}


def timed(command: list[str], expected_code: int) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != expected_code:
        raise SystemExit(f"{command} exited {result.returncode}, expected {expected_code}: {result.stderr[-500:]}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli_startup.json"))
    args = parser.parse_args(argv)
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    timed(*COMMANDS["python -c 'import hf_speft'"])  # warm the file cache once
    for _ in range(args.repeats):  # interleaved, so a busy moment hits every command alike
        for name, (command, code) in COMMANDS.items():
            seconds[name].append(timed(command, code))
    result = {"setting": {"repeats": args.repeats, "python": platform.python_version(), "cpus": os.cpu_count()},
              "goal_seconds": GOAL_SECONDS, "seconds": seconds,
              "median_seconds": {name: statistics.median(values) for name, values in seconds.items()}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, median in result["median_seconds"].items():
        print(f"{name:35s} {median:.3f} s")


if __name__ == "__main__":
    main()

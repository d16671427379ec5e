"""Reading users' jsonl files, with errors that name the file and the line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line; ValueError naming the file and line for bad JSON."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist.")
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}, line {number}: not valid JSON.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object.")
            yield number, row

"""Print pip constraints that pin each direct requirement of pyproject.toml to the lowest version its range allows.

`make test-oldest` installs with these (`pip install -c`), so the suite runs on the floor of every claimed range
(direct dependencies only; their own dependencies resolve as pip chooses). A requirement without a `>=` or `==`
floor is left out. `--pin NAME==VERSION` replaces a floor that cannot be installed here (torch: only the CPU build
on this machine's disk is used, so the floor of its range is not what this target tests).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def _floor(specifiers: str) -> str | None:
    for spec in specifiers.split(","):
        match = re.fullmatch(r"\s*(>=|==)\s*([^\s,]+)\s*", spec)
        if match:
            return match.group(2)
    return None


def lower_bounds(pyproject: Path, extras: list[str]) -> dict[str, str]:
    """{normalised name: floor} for the project's dependencies plus the named optional-dependency groups."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in groups]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml defines {sorted(groups)}")
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += groups[extra]
    floors: dict[str, str] = {}
    for requirement in requirements:
        match = _REQ.match(requirement)
        if match is None:
            raise SystemExit(f"cannot parse requirement {requirement!r} in {pyproject}")
        name, version = re.sub(r"[-_.]+", "-", match.group(1)).lower(), _floor(match.group(2))
        if version is not None:
            floors[name] = max(floors.get(name, version), version, key=_version_key)
    return floors


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    parser.add_argument("--extras", nargs="*", default=["test"], help="optional-dependency groups to include")
    parser.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION", help="override one floor")
    args = parser.parse_args(argv)
    floors = lower_bounds(args.pyproject, args.extras)
    for pin in args.pin:
        name, sep, version = pin.partition("==")
        if not sep or not version:
            raise SystemExit(f"--pin {pin!r}: expected NAME==VERSION")
        floors[re.sub(r"[-_.]+", "-", name).lower()] = version
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in sorted(floors.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

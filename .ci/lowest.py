"""Print pip constraints that pin every core dependency of pyproject.toml to its lower bound (`name>=X` ->
`name==X`), for the lowest-versions job of `.ci/run`. A dependency without a lower bound is an error: every
core dependency must say the oldest release it supports."""

import re
import sys
import tomllib
from pathlib import Path

LOWER_BOUND = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def lowest_constraints(pyproject: Path) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for requirement in dependencies:
        match = LOWER_BOUND.match(requirement)
        if match is None:
            sys.exit(f"{pyproject}: dependency {requirement!r} has no lower bound (name>=VERSION)")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


if __name__ == "__main__":
    print("\n".join(lowest_constraints(Path(__file__).resolve().parents[1] / "pyproject.toml")))

"""Runs the test suite with every dependency at the lowest version pyproject.toml admits.

Why it exists: a lower bound in pyproject.toml is a promise that the version works. This script keeps the
promise checked: it reads each `name>=X` of the project's dependencies (and of the `test` extra), installs
exactly `name==X` into a fresh virtual environment (the pinned CPU torch first), installs leanfoem itself
without dependencies, and runs pytest there. A resolver conflict, an import error or a failing test means a
bound is too low. Needs the package registry.

    python tools/check_lower_bounds.py [--venv DIR] [-- PYTEST_ARGS...]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lowest_pins(project: dict) -> list[str]:
    """`name==X` for each `name>=X` among the dependencies and the test extra; anything else is an error."""
    pins = []
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9][0-9A-Za-z.]*)", spec.replace(" ", ""))
        if not match:
            raise SystemExit(f"check_lower_bounds: cannot read a lower bound from {spec!r}")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-lowest", help="where to build the environment")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    pins = lowest_pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"])
    torch = next(p for p in pins if p.startswith("torch=="))
    if not (args.venv / "bin" / "python").exists():
        venv.create(args.venv, with_pip=True)
    python = str(args.venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    print("lowest versions:", " ".join(pins), flush=True)
    subprocess.run(pip + [torch], check=True)
    subprocess.run(pip + pins, check=True)
    subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True)
    subprocess.run([python, "-m", "pip", "check"], check=True)
    return subprocess.run([python, "-m", "pytest", "-q", *args.pytest_args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())

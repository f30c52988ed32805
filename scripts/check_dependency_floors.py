"""Do the lowest versions pyproject.toml allows really work? Installs every dependency with a ``>=``
floor at exactly that floor into a scratch folder, puts it ahead of the venv's packages, and runs
the test suite against it.

    .venv/bin/python scripts/check_dependency_floors.py            # (Python 3.11+: tomllib)
    .venv/bin/python scripts/check_dependency_floors.py --pin pillow==9.3.0 -- tests/test_file_datasets.py

torch and torchvision keep the installed build (their floors are CUDA wheels of several GB; the
range is pyproject's comment). Packages are installed without their own dependencies, so each
floor is checked against the venv's versions of the rest. ``--pin name==version`` replaces a
floor, e.g. for a floor without a wheel for this Python (pillow 9.0 has none for 3.11). Arguments
after ``--`` go to pytest (default: the whole CPU suite).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEEP_INSTALLED = {"torch", "torchvision"}
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*>=\s*([\w.]+)")


def declared_floors(pyproject: Path) -> dict[str, str]:
    """name -> lowest version, over the dependencies and the test extra (the higher floor where both
    name a package: the suite needs that one)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    floors: dict[str, str] = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        match = FLOOR.match(requirement)
        if not match or match.group(1).lower() in KEEP_INSTALLED:
            continue
        name, version = match.group(1).lower(), match.group(2)
        if name not in floors or _version_key(version) > _version_key(floors[name]):
            floors[name] = version
    return floors


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION", help="use this version instead of the floor")
    parser.add_argument("pytest_args", nargs="*", default=["-m", "not cuda", "-q", "-p", "no:cacheprovider"])
    args = parser.parse_args()
    pins = declared_floors(REPO / "pyproject.toml")
    for pin in args.pin:
        name, separator, version = pin.partition("==")
        if not separator or not version:
            parser.error(f"--pin takes NAME==VERSION, got {pin!r}")
        pins[name.lower()] = version
    requirements = [f"{name}=={version}" for name, version in sorted(pins.items())]
    print("floors:", " ".join(requirements), flush=True)
    with tempfile.TemporaryDirectory(prefix="dependency_floors_") as site:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, *requirements], check=True)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([site, str(REPO / "src")])}
        report = "import importlib.metadata as m; print('installed:', ' '.join(f'{n}=={m.version(n)}' for n in %r))" % sorted(pins)
        subprocess.run([sys.executable, "-c", report], env=environment, check=True)
        return subprocess.run([sys.executable, "-m", "pytest", *args.pytest_args], cwd=REPO, env=environment).returncode


if __name__ == "__main__":
    sys.exit(main())

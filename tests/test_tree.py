"""The repository's top level is what the layout in docs/development.md lists: no scratch
files."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers import ROOT


def _listed_in_the_layout() -> set[str]:
    layout = (ROOT / "docs" / "development.md").read_text().split("\n## Layout\n", 1)[1]
    table = layout.split("| entry | what it is |", 1)[1].split("\n\n", 1)[0]
    names: set[str] = set()
    for row in table.splitlines()[2:]:
        first_cell = row.split("|")[1]
        names.update(name.rstrip("/") for name in re.findall(r"`([^`]+)`", first_cell))
    return names


def _tracked_top_level() -> set[str]:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    return {path.split("/", 1)[0] for path in files}


def test_the_top_level_is_what_the_layout_lists() -> None:
    tracked, listed = _tracked_top_level(), _listed_in_the_layout()
    assert tracked - listed == set(), "tracked but not in the layout of docs/development.md"
    assert listed - tracked == set(), "in the layout of docs/development.md but not tracked"


def test_build_output_is_ignored() -> None:
    for path in ("build/lib/x.py", "dist/kling_exporter-1.0.tar.gz"):
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", path], cwd=ROOT, check=False, timeout=30
        )
        assert ignored.returncode == 0, f"{path} is not ignored"


def test_the_license_is_apache_2_and_named_in_the_package() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 kling-exporter authors\n")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject
    assert 'license-files = ["LICENSE"]' in pyproject


def _make_dry_run(target: str, tmp_path: Path) -> str:
    """What ``make TARGET`` would run from a clean clone (a virtual environment not made)."""
    venv = tmp_path / "venv"
    return subprocess.run(
        ["make", "-n", f"VENV={venv}", f"UV_DIR={tmp_path / 'uv'}", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_running_installs_the_runtime_only_from_the_lock(tmp_path: Path) -> None:
    for target in ("run", "demo"):
        commands = _make_dry_run(target, tmp_path)
        assert "pip install --quiet --require-hashes -r scripts/uv-requirements.txt" in commands
        assert "sync --quiet --locked --inexact" in commands, target
        assert "--extra dev" not in commands and "pip install --quiet -e" not in commands, target


def test_testing_from_a_clean_clone_installs_everything_from_the_lock(tmp_path: Path) -> None:
    commands = _make_dry_run("test", tmp_path)
    install = commands.index("sync --quiet --locked --extra dev")
    assert commands.index("-m venv") < install < commands.index("ruff check")
    assert commands.index("lock --check") < commands.index("ruff check")
    assert "pytest" in commands


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    """uv.lock names an exact version, with hashes, for every runtime and development
    dependency that pyproject.toml lists, and pyproject.toml keeps ranges."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    packages = {p["name"]: p for p in lock["package"]}
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    for spec in wanted:
        name = re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")
        assert name in packages, f"{name} is not in uv.lock: run make lock"
    for name, package in packages.items():
        if name == "kling-exporter":
            continue
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", package["version"]), name
        files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        assert files and all(f["hash"].startswith("sha256:") for f in files), name
    runtime = project["dependencies"]
    assert all(re.search(r">=|~=", spec) for spec in runtime), "pyproject.toml keeps ranges"


def _loaded_by(module: str) -> tuple[set[str], set[str]]:
    """The libraries (aiohttp, redis, jwt) and the package's own modules that importing
    ``module`` in a fresh interpreter loads."""
    probe = (
        f"import sys, {module}; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'aiohttp', 'redis', 'jwt'}))); "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('kling_exporter.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split("\n")
    return set(out[0].split()), set(out[1].split())


def test_each_process_loads_only_the_libraries_it_runs() -> None:
    """Start time is mostly imports: the reader child needs no HTTP client, and an
    exporter outside a fleet no Redis client (redis-py alone was a third of a start)."""
    reader_libraries, reader_modules = _loaded_by("kling_exporter.reading.reader")
    assert reader_libraries == set()
    assert not {m for m in reader_modules if m.startswith("kling_exporter.serving.")}
    server_libraries, _ = _loaded_by("kling_exporter.cli")
    assert "redis" not in server_libraries


def test_the_http_process_loads_no_reader_no_stand_in_and_no_reports() -> None:
    """The daemon's HTTP process (``kling-exporter serve``) imports what it serves: of
    the reading stage only the listing's error the CLI names, nothing of the ledger but
    its counters' histogram, and neither the stand-in of Kling nor the demo nor the
    reports."""
    _, modules = _loaded_by("kling_exporter.cli")
    assert {m for m in modules if m.startswith("kling_exporter.reading.")} == {
        "kling_exporter.reading.listing"
    }
    assert {m for m in modules if m.startswith("kling_exporter.accounting.")} == {
        "kling_exporter.accounting.counters"
    }
    for module in ("kling.standin", "demo", "reports", "report_text"):
        assert f"kling_exporter.{module}" not in modules


def test_the_layout_lists_every_module_of_the_package_where_it_is() -> None:
    """docs/development.md's map of the package is the tree: each module under its
    folder (a row in bold opens a folder; the front end and the contract are the
    package's root), and nothing listed that is not there."""
    layout = (ROOT / "docs" / "development.md").read_text().split("\n## Layout\n", 1)[1]
    table = layout.split("| folder or module | its one job |", 1)[1].split("\n\n", 1)[0]
    listed: set[str] = set()
    folder = ""
    for row in table.splitlines()[2:]:
        first_cell = row.split("|")[1].strip()
        if first_cell.startswith("**"):
            opened = re.fullmatch(r"\*\*`([a-z_]+)/`\*\*", first_cell)
            folder = f"{opened.group(1)}/" if opened else ""
            continue
        listed.update(folder + name for name in re.findall(r"`([^`]+)`", first_cell))
    package = ROOT / "exporter" / "kling_exporter"
    present = {
        str(path.relative_to(package))
        for path in package.rglob("*")
        if path.suffix in (".py", ".lua") and path.name != "__init__.py"
    }
    assert listed == present


def test_the_wheel_lists_every_folder_of_the_package() -> None:
    """The packages are listed by name in pyproject.toml: a stage folder left off that
    list would be missing from the wheel and the image, though every test passes on
    the source tree."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = ROOT / "exporter" / "kling_exporter"
    folders = {
        ".".join(("kling_exporter", *path.parent.relative_to(package).parts))
        for path in package.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert set(setuptools["packages"]) == folders
    for name, files in setuptools["package-data"].items():
        folder = package.joinpath(*name.split(".")[1:])
        assert all((folder / f).is_file() for f in files), name

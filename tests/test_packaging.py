"""Packaging: every third-party import is declared in pyproject.toml (base or an extra), pinned in
constraints.txt, and a command whose extra is not installed ends with one line naming it.

"Not installed" is simulated in a fresh interpreter by `sys.modules[name] = None` for every module of
an extra: `import name` then raises ModuleNotFoundError(name=name) and importlib.util.find_spec(name)
returns None, as for a package that is absent (a venv with only the base dependencies cannot be built
here: the wheel cache holds torch alone).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from core.errors import OPTIONAL_MODULES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "launch", "trainer", "modeling", "sharding")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group())


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(base distributions, {extra: distributions}) of pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {extra: {requirement_name(r) for r in requirements}
              for extra, requirements in project["optional-dependencies"].items()}
    return {requirement_name(r) for r in project["dependencies"]}, extras


@functools.cache
def imports() -> dict[str, dict[str, bool]]:
    """{top-level third-party module: {file: imported when the file is (not only inside a function)}}."""
    found: dict[str, dict[str, bool]] = {}
    own = set(PACKAGES) | set(sys.stdlib_module_names) | {"__future__"}

    def visit(node: ast.AST, path: str, is_module_level: bool) -> None:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in own:
                entry = found.setdefault(top, {})
                entry[path] = entry.get(path, False) or is_module_level
        for child in ast.iter_child_nodes(node):
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, path, is_module_level and not is_function)

    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            visit(ast.parse(path.read_text(), str(path)), str(path.relative_to(REPO)), True)
    return found


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # {top-level module: distributions}; reads every installed one


def distribution_of(module: str) -> str:
    distributions = installed_distributions().get(module)
    assert distributions, f"{module} is imported but not installed in this environment"
    return normalize(distributions[0])


def test_every_third_party_import_is_declared():
    base, extras = declared()
    every = base.union(*extras.values())
    undeclared = {module: sorted(files) for module, files in imports().items() if distribution_of(module) not in every}
    assert not undeclared, f"imported but not in pyproject.toml's dependencies or extras: {undeclared}"


def test_packages_of_extras_are_imported_only_where_used():
    """No module imports an extra's package when it is imported itself: `tokfleet --help`, `tokfleet models`
    and every command that does not use the extra work without it."""
    base, _ = declared()
    at_import = {module: sorted(path for path, is_module_level in files.items() if is_module_level)
                 for module, files in imports().items() if distribution_of(module) not in base}
    assert not {module: files for module, files in at_import.items() if files}


def test_optional_modules_table_matches_the_extras():
    """core.errors.OPTIONAL_MODULES names each extra's packages (what the one-line error says to install)."""
    base, extras = declared()
    table = {(normalize(distribution), extra) for distribution, extra in OPTIONAL_MODULES.values()}
    expected = {(distribution, extra) for extra, distributions in extras.items() if extra != "dev"
                for distribution in distributions - base}
    assert table == expected
    for module, (distribution, _) in OPTIONAL_MODULES.items():
        assert distribution_of(module) == normalize(distribution)


def test_constraints_pin_every_declared_package():
    base, extras = declared()
    pinned = {normalize(line.split("==")[0]) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    assert base.union(*extras.values()) - pinned == set()


def run_without_extras(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`tokfleet ARGS` in a fresh interpreter where no package of an extra can be imported."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({sorted(OPTIONAL_MODULES)!r})); "
            "from launch.cli import main; main()")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_and_models_need_no_extra(tmp_path):
    result = run_without_extras(tmp_path, "--help")
    assert result.returncode == 0 and "prepare" in result.stdout, result.stderr
    result = run_without_extras(tmp_path, "models")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines()}
    assert {"gpt", "totem", "tokcom_vae", "FlatGPT", "BrainOmniCausalTokenizer", "Vidtok"} <= listed


@pytest.mark.parametrize("kind, package, extra", [("meg", "mne", "meg"), ("video", "av", "video")])
def test_prepare_names_the_missing_package_and_its_extra(tmp_path, kind, package, extra):
    config = tmp_path / f"prepare_{kind}.yaml"
    # a cluster address: nothing here may start a local Ray (the check comes first, so none is reached)
    config.write_text(f"source:\n  kind: {kind}\n  paths: ['{tmp_path}/in/*']\nshards:\n  output: {tmp_path}/out\n  name: {kind}\n"
                      "ray:\n  address: 127.0.0.1:1\n")
    result = run_without_extras(tmp_path, "prepare", str(config), "--print-config")
    assert result.returncode == 0, result.stderr  # the config alone needs no extra
    result = run_without_extras(tmp_path, "prepare", str(config))
    assert result.returncode == 2
    assert result.stderr == (f"tokfleet: error: `tokfleet prepare` needs {package}, which is not installed: "
                             f"pip install 'tokfleet[{extra}]'\n")
    assert not (tmp_path / "out").exists()


def test_s3_url_without_s3fs_names_the_s3_extra(tmp_path):
    """fsspec raises its own ImportError from s3fs's ModuleNotFoundError: the cause is followed."""
    result = run_without_extras(tmp_path, "inspect", "s3://bucket/dataset")
    assert result.returncode == 2
    assert result.stderr == "tokfleet: error: `tokfleet inspect` needs s3fs, which is not installed: pip install 'tokfleet[s3]'\n"

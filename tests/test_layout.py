"""The package layering: each package imports only the ones below it (read from the source, every import,
lazy ones inside functions included).

    launch (CLI, jobs)            the roof: may import everything
    trainer                       core, modeling, sharding
    modeling    sharding          core (and, for modeling, nothing distributed: the MoE dispatch aside)
    core                          config, schema, errors, argument parsing, the loopback namespace
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("core", "launch", "trainer", "modeling", "sharding")
ALLOWED = {
    "core": {"core"},
    "modeling": {"core", "modeling"},
    "sharding": {"core", "sharding"},
    "trainer": {"core", "modeling", "sharding", "trainer"},
    "launch": set(OURS),
}
DISTRIBUTED = ("deepspeed", "accelerate", "torch.distributed")


def imported_modules(path: Path) -> list[str]:
    """Every module `path` imports, absolute names, wherever the import statement is."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", OURS)
def test_packages_import_only_the_layers_below(package):
    wrong = [f"{path.relative_to(ROOT)} imports {name}"
             for path in sources(package) for name in imported_modules(path)
             if name.split(".")[0] in OURS and name.split(".")[0] not in ALLOWED[package]]
    assert not wrong, "\n".join(wrong)


def test_model_code_imports_no_distributed_framework():
    allowed = {ROOT / "modeling" / "layers" / "moe_dispatch.py"}  # receives its process group from outside
    wrong = [f"{path.relative_to(ROOT)} imports {name}"
             for path in sources("modeling") if path not in allowed
             for name in imported_modules(path) if name.startswith(DISTRIBUTED)]
    assert not wrong, "\n".join(wrong)


def test_engines_do_not_import_each_other_in_a_cycle():
    engines = {path.stem: {name.split(".")[2] for name in imported_modules(path)
                           if name.startswith("trainer.engines.") and len(name.split(".")) > 2}
               for path in (ROOT / "trainer" / "engines").glob("*.py")}
    cycles = [(a, b) for a, imports in engines.items() for b in imports if a in engines.get(b, set()) and a < b]
    assert not cycles


def test_model_families_live_in_their_folders():
    """modeling/ holds only the registry and the report types at its root; families sit in folders."""
    at_root = sorted(path.name for path in (ROOT / "modeling").glob("*.py"))
    assert at_root == ["__init__.py", "registry.py", "reports.py"]
    from modeling.registry import _MODEL_MODULES

    for name, module in _MODEL_MODULES.items():
        assert module.count(".") == 2, f"{name}: {module} is not in a family folder"


# within modeling/: shared layers below the tokenizers, the tokenizers below the forecasters that read
# their codes; the families of models (text, brain, transformer) do not import each other
MODELING_ALLOWED = {
    "layers": {"layers"},
    "tokenizers": {"layers", "tokenizers"},
    "text": {"layers", "text"},
    "transformer": {"layers", "transformer"},
    "brain": {"layers", "tokenizers", "brain"},
}


def test_model_families_import_only_shared_layers_and_tokenizers():
    assert {path.name for path in (ROOT / "modeling").iterdir() if path.is_dir() and path.name != "__pycache__"} \
        == set(MODELING_ALLOWED)
    wrong = [f"{path.relative_to(ROOT)} imports {name}"
             for family, allowed in MODELING_ALLOWED.items() for path in sources(f"modeling/{family}")
             for name in imported_modules(path)
             if name.startswith("modeling.") and name.split(".")[1] not in {*allowed, "registry", "reports"}]
    assert not wrong, "\n".join(wrong)

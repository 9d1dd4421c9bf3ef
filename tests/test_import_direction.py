"""Imports flow one way: only the apps (and the launcher/CLI that start them) wire things up.

``strategies`` and the ``fedpeft`` core never import the apps; ``strategies`` knows nothing
of fedpeft; only ``fedpeft.models`` imports peft; only ``fedpeft.privacy`` imports opacus
(and its accounting imports only opacus' accountants: no torch, Flower or models); only the
launcher touches Flower's simulation engine.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_LAYER = {"fedpeft.apps", "fedpeft.launch", "fedpeft.deploy", "fedpeft.cli", "fedpeft.sweep"}


def _modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        yield name, path


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize(("module", "path"), list(_modules("fedpeft")) + list(_modules("strategies")))
def test_import_direction(module, path):
    imports = _imports(path)
    if not _under(module, APP_LAYER):
        bad = {i for i in imports if _under(i, APP_LAYER)}
        assert not bad, f"{module} (core) imports the app layer: {bad}"
    if module.startswith("strategies"):
        assert not {i for i in imports if _under(i, {"fedpeft"})}, f"{module} imports fedpeft"
    if not _under(module, {"fedpeft.models"}):
        assert not {i for i in imports if _under(i, {"peft"})}, (
            f"{module} imports peft outside fedpeft.models"
        )
    if not _under(module, {"fedpeft.privacy"}):
        assert not {i for i in imports if _under(i, {"opacus"})}, (
            f"{module} imports opacus outside fedpeft.privacy"
        )
    if module == "fedpeft.privacy.accounting":  # pure maths: Opacus' accountants, nothing that trains
        impure = {"opacus", "torch", "flwr", "fedpeft.models", "fedpeft.training", "fedpeft.privacy.dpsgd"}
        bad = {i for i in imports if _under(i, impure) and not _under(i, {"opacus.accountants"})}
        assert not bad, f"{module} is not pure accounting: {bad}"
    if module != "fedpeft.launch":
        assert not {i for i in imports if _under(i, {"flwr.simulation"})}, f"{module} starts simulations"

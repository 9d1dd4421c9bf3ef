"""Imports flow one way: only the apps (and the launcher/CLI that start them) wire things up.

``strategies`` and the ``fedpeft`` core never import the apps; the core never imports the
server wing (``fedpeft.server``), which never imports the apps; ``strategies`` knows nothing
of fedpeft but its door to Flower's internals; only ``fedpeft.models`` imports peft, and only
it and ``fedpeft.tasks`` (tokenizers, collators) import transformers; only
``fedpeft.privacy`` imports opacus (and its accounting imports only opacus' accountants: no
torch, Flower or models); only ``fedpeft.flower_compat`` touches Flower's private modules
(the simulation engine included).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_LAYER = {"fedpeft.apps", "fedpeft.launch", "fedpeft.deploy", "fedpeft.cli", "fedpeft.sweep"}
# Flower's public API: what these packages (with flwr.serverapp.strategy, flwr.clientapp.mod)
# export.  Every other flwr module (flwr.common, flwr.supercore, flwr.server, flwr.proto,
# flwr.compat, flwr.supernode, flwr.simulation, ...) and flwr itself are private.
PUBLIC_FLOWER = {"flwr.app", "flwr.serverapp", "flwr.clientapp"}
FLOWER_DOOR = "fedpeft.flower_compat"


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
        fedpeft = {i for i in imports if _under(i, {"fedpeft"}) and i != FLOWER_DOOR}
        assert not fedpeft, f"{module} imports fedpeft beyond {FLOWER_DOOR}: {fedpeft}"
    if module == FLOWER_DOOR:  # a leaf, so that strategies may use it
        assert not {i for i in imports if _under(i, {"fedpeft", "strategies"})}, f"{module} imports fedpeft"
    if not _under(module, {"fedpeft.models", "fedpeft.tasks"}):
        hf = {i for i in imports if _under(i, {"peft", "transformers"})}
        assert not hf, f"{module} imports {hf} outside fedpeft.models / fedpeft.tasks"
    if _under(module, {"fedpeft.tasks"}):
        assert not {i for i in imports if _under(i, {"peft"})}, (
            f"{module} imports peft outside fedpeft.models"
        )
    if not _under(module, APP_LAYER | {"fedpeft.server"}):
        bad = {i for i in imports if _under(i, {"fedpeft.server"})}
        assert not bad, f"{module} (core) imports the server wing: {bad}"
    if _under(module, {"fedpeft.server"}):
        assert not {i for i in imports if _under(i, {"fedpeft.apps"})}, f"{module} imports the apps"
    if module != FLOWER_DOOR:
        private = {i for i in imports if _under(i, {"flwr"}) and not _under(i, PUBLIC_FLOWER)}
        assert not private, f"{module} imports private Flower modules (use {FLOWER_DOOR}): {private}"

    if not _under(module, {"fedpeft.privacy"}):
        assert not {i for i in imports if _under(i, {"opacus"})}, (
            f"{module} imports opacus outside fedpeft.privacy"
        )
    if module == "fedpeft.privacy.accounting":  # pure maths: Opacus' accountants, nothing that trains
        impure = {"opacus", "torch", "flwr", "fedpeft.models", "fedpeft.training", "fedpeft.privacy.dpsgd"}
        bad = {i for i in imports if _under(i, impure) and not _under(i, {"opacus.accountants"})}
        assert not bad, f"{module} is not pure accounting: {bad}"


def test_private_flower_modules_are_told_apart():
    def private(name):
        return _under(name, {"flwr"}) and not _under(name, PUBLIC_FLOWER)

    assert all(
        map(private, ["flwr", "flwr.common.serde", "flwr.supercore.run", "flwr.simulation.run_simulation"])
    )
    assert all(
        map(private, ["flwr.server.superlink.fleet.vce", "flwr.proto.message_pb2", "flwr.compat.client"])
    )
    assert not any(map(private, ["flwr.app", "flwr.serverapp.strategy", "flwr.clientapp.mod", "flwrx"]))

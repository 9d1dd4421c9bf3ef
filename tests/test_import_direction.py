"""Imports flow one way: only the apps (and the launcher/CLI that start them) wire things up.

``strategies`` and the ``fedpeft`` core never import the apps; the core never imports the
server wing (``fedpeft.server``), which never imports the apps; ``strategies`` knows nothing
of fedpeft but its door to Flower's internals; only ``fedpeft.models`` imports peft, and only
it and ``fedpeft.tasks`` (tokenizers, collators) import transformers; only
``fedpeft.privacy`` imports opacus (and its accounting imports only opacus' accountants: no
torch, Flower or models); only ``fedpeft.flower_compat`` touches Flower's private modules
(the simulation engine included).  And no two modules import each other, however deep in
a function the import sits: a cycle held apart by a function-level import is still a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_LAYER = {"fedpeft.apps", "fedpeft.running", "fedpeft.cli", "fedpeft.results.sweep"}
# Flower's public API: what these packages (with flwr.serverapp.strategy, flwr.clientapp.mod)
# export.  Every other flwr module (flwr.common, flwr.supercore, flwr.server, flwr.proto,
# flwr.compat, flwr.supernode, flwr.simulation, ...) and flwr itself are private.
PUBLIC_FLOWER = {"flwr.app", "flwr.serverapp", "flwr.clientapp"}
FLOWER_DOOR = "fedpeft.flower_compat"


SERVER_SETTINGS = "fedpeft.server.settings"


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
        # The wing's settings module only declares its sections (the run config reads every
        # feature's); it imports none of the wing's code.
        bad = {i for i in imports if _under(i, {"fedpeft.server"}) and i != SERVER_SETTINGS}
        assert not bad, f"{module} (core) imports the server wing: {bad}"
    if _under(module, {"fedpeft.server"}):
        assert not {i for i in imports if _under(i, {"fedpeft.apps"})}, f"{module} imports the apps"
    if module == SERVER_SETTINGS:
        assert not {i for i in imports if _under(i, {"fedpeft.server"})}, f"{module} imports the wing's code"
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


def _runtime_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports when it runs, at any depth of its code
    (a function-level import too; ``if TYPE_CHECKING:`` blocks are not run, so not counted)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import sub`` needs the module pkg.sub; ``from pkg import name``, pkg itself.
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_cycles() -> list[set[str]]:
    """Every set of modules that import each other, directly or round about (Tarjan's SCCs)."""
    modules = dict(_modules("fedpeft")) | dict(_modules("strategies"))
    graph = {name: _runtime_imports(name, path, set(modules)) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    cycles = [sorted(c) for c in import_cycles()]
    assert not cycles, f"modules that import each other (function-level imports included): {cycles}"


def test_the_cycle_finder_sees_function_level_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "fedpeft"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import fedpeft.b\n")
    (pkg / "b.py").write_text("def f():\n    from fedpeft.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fedpeft.a\n")
    (tmp_path / "strategies").mkdir()
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert import_cycles() == [{"fedpeft.a", "fedpeft.b"}]

"""The house: imports point one way (entry points -> engine -> config -> sweep -> evaluation ->
inference -> trained -> data, models, stats -> core), data, models and stats stay apart, and no
module imports itself back through others. Read from the source (imports inside functions
included), not run."""

from __future__ import annotations

import ast
from pathlib import Path

from tb_lightning.config import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "src" / "tb_lightning"
# Lower numbers are lower floors; a module may import its own floor and the ones below.
LAYERS = {
    "core": 0,
    "data": 1,
    "models": 1,
    "stats": 1,
    "trained": 2,
    "inference": 3,
    "evaluation": 4,
    "sweep": 5,
    "config": 6,
    "engine": 7,
}
ENTRY_LAYER = 8  # train.py, eval.py, predict.py, export.py
# Packages of one floor that must not import each other.
APART = {(a, b) for a in ("data", "models", "stats") for b in ("data", "models", "stats") if a != b}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    room = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS.get(room, ENTRY_LAYER), room


def import_graph() -> dict[str, set[str]]:
    """module -> the tb_lightning modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                targets |= {n for n in names if n in modules}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        graph[name] = {t for t in targets if t.startswith("tb_lightning") and t != name}
    return graph


def test_imports_point_down_and_data_and_models_stay_apart():
    upward = []
    for source, targets in import_graph().items():
        (src_floor, src_room) = layer(source)
        for target in targets:
            (dst_floor, dst_room) = layer(target)
            if dst_floor > src_floor or (src_room, dst_room) in APART:
                upward.append(f"{source} -> {target}")
    assert not upward, "imports that point up (or across data/models):\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_two_modules_differ_only_in_grammar():
    """No predict.py beside prediction.py, export.py beside exporting.py: one name per role."""
    stems = {}
    for path in PACKAGE.rglob("*.py"):
        stem = path.stem.removesuffix("ing").removesuffix("ion").removesuffix("e")
        stems.setdefault((path.parent, stem), []).append(path.name)
    twins = [names for names in stems.values() if len(names) > 1]
    assert not twins, twins

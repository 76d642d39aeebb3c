"""The import structure of acip/ (read with ast): no circles, and acip.core stands on its own."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "acip"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """acip modules imported anywhere in the file (module level and inside functions)."""
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: _imports(p, set(files)) for m, p in files.items()}


def test_no_import_circles():
    graph = _graph()
    # a package's __init__ re-exporting its own submodules is not a circle
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d in graph)} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in edges.get(m, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_imports_nothing_above_it():
    graph = _graph()
    assert "acip.core.parametrize" in graph and "acip.core.score_map" in graph
    forbidden = ("acip.train", "acip.cli", "acip.quant", "acip.export", "acip.eval", "acip.load")
    bad = {m: sorted(d for d in deps if d == "acip" or d.startswith(forbidden))
           for m, deps in graph.items() if m.startswith("acip.core")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}
    third_party = set()
    for p in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                third_party |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                third_party.add(node.module.split(".")[0])
    assert not third_party & {"lightning", "hydra", "omegaconf", "wandb", "pytorch_lightning"}, third_party

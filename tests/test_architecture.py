"""The shape the code promised in docs/ARCHITECTURE.md, checked statically (no torch import needed):

* no import cycle between speedrun modules at import time (imports inside functions, which break
  cycles on purpose and keep start-up fast, do not count; neither do `if TYPE_CHECKING:` blocks);
* no function in speedrun/ over 120 lines, and train()'s loop within 80 lines;
* every module of speedrun/ is named in docs/ARCHITECTURE.md.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "speedrun"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))
            if "template" not in p.parts and "results" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module):
    """Import nodes run at import time: module body, and if/try/with blocks at module level."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody)
            for h in node.handlers:
                stack.extend(h.body)
        elif isinstance(node, ast.With):
            stack.extend(node.body)


def _resolve(name: str, path: Path, node) -> list:
    """Absolute speedrun module names an import node pulls in."""
    is_pkg = path.name == "__init__.py"
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = name.split(".")
        base = base if is_pkg else base[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [mod] + [f"{mod}.{a.name}" for a in node.names]


def _graph():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = set()
        for node in _top_level_imports(tree):
            for target in _resolve(name, path, node):
                # importing a.b.c imports a and a.b too: keep every existing prefix
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    cand = ".".join(parts[:i])
                    if cand in mods and cand != name:
                        deps.add(cand)
        graph[name] = deps
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None (a package importing its own submodules from
    __init__ is how packages work and is not a cycle; a submodule importing its parent package is
    fine too, because the parent is already in sys.modules by then)."""
    def edges(a):
        for b in graph[a]:
            if b.startswith(a + ".") or a.startswith(b + "."):
                continue
            yield b

    WHITE, GREY, BLACK = 0, 1, 2
    color = {m: WHITE for m in graph}
    stack = []

    def visit(m):
        color[m] = GREY
        stack.append(m)
        for n in edges(m):
            if color[n] == GREY:
                return stack[stack.index(n):] + [n]
            if color[n] == WHITE:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        color[m] = BLACK
        return None

    for m in sorted(graph):
        if color[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = _graph()
    assert "speedrun.train" in graph and graph["speedrun.train"], "the import graph came out empty"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # package <-> its submodule


def _functions():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def test_no_function_over_120_lines():
    long = [f"{m}.{f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for m, f in _functions() if f.end_lineno - f.lineno + 1 > 120]
    assert not long, "split these: " + ", ".join(long)


def test_train_loop_within_80_lines():
    train = [f for m, f in _functions() if m == "speedrun.train" and f.name == "train"]
    assert len(train) == 1
    loops = [n for n in ast.walk(train[0]) if isinstance(n, (ast.While, ast.For))]
    outer = max(loops, key=lambda n: n.end_lineno - n.lineno)
    assert outer.end_lineno - outer.lineno + 1 <= 80


@pytest.mark.parametrize("doc", ["docs/ARCHITECTURE.md"])
def test_every_module_is_on_the_map(doc):
    text = (ROOT / doc).read_text()
    missing = []
    for name, path in _modules().items():
        parts = name.split(".")
        if len(parts) < 2 or parts[-1].startswith("_") or parts[1] in ("bench",):
            continue
        top = parts[1]
        leaf = path.relative_to(PKG).parts[0]
        leaf = leaf if leaf.endswith(".py") else leaf + "/"
        if f"`{leaf}`" not in text and f"`{top}`" not in text:
            missing.append(name)
    assert not missing, f"{doc} does not name: {', '.join(missing)}"

"""The package's shape: DESIGN.md's layout drawing names exactly the modules that exist, the
import graph of `sae_dist` has no cycle, and no function imports a `sae_dist` module."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sae_dist"


def drawn_modules(design: str) -> set[str]:
    """Module paths (`sae_dist/train/loop.py`) of the drawing in DESIGN.md section 3: folder
    lines end in `/`, nesting is given by two-space indentation."""
    section = design.split("## 3. Layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    stack: list[tuple[int, str]] = []
    found = set()
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or not (m.group(2).endswith("/") or m.group(2).endswith(".py")):
            continue
        depth, name = len(m.group(1)) // 2, m.group(2)
        stack = stack[:depth]
        if name.endswith("/"):
            stack.append((depth, name.rstrip("/")))
        elif stack and stack[0][1] == "sae_dist":
            found.add("/".join([s for _, s in stack] + [name]))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the sae_dist modules it imports at run time} (TYPE_CHECKING blocks aside); an
    import of `pkg.mod` also depends on `pkg` (its __init__ runs first)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                deps |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        graph[name] = {
            d for d in deps if d in modules and d != name and not name.startswith(d + ".")
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_design_layout_names_exactly_the_modules_of_the_package():
    drawn = drawn_modules((ROOT / "DESIGN.md").read_text())
    actual = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert sorted(actual - drawn) == [], "modules missing from DESIGN.md section 3"
    assert sorted(drawn - actual) == [], "DESIGN.md section 3 names modules that do not exist"


def test_drawing_parser_sees_nesting_and_ignores_other_folders():
    design = (
        "## 3. Layout\n```\nsae_dist/\n  a.py   x\n  sub/\n    b.py  y\n  c.py\n"
        "conf/  train.yaml\n```\n## 4. Next\n"
    )
    assert drawn_modules(design) == {"sae_dist/a.py", "sae_dist/sub/b.py", "sae_dist/c.py"}


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_imports_a_sae_dist_module():
    local = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                        "sae_dist"
                    ):
                        local.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert local == []

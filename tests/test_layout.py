"""The package's layout keeps the map in docs/design.md: imports point down, no circles, nothing outside the repo.

The map is the table between `map:begin` and `map:end` in docs/design.md (room | owns | may import).
Every import of t5lite is read with `ast`, also the ones inside functions: a lazy import is still
an import a reader has to follow.
"""

import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "t5lite")


def read_map(text: str) -> dict[str, set[str]]:
    """{room: rooms it may import} from the design page's table."""
    block = text.split("<!-- map:begin -->")[1].split("<!-- map:end -->")[0]
    rooms = {}
    for line in block.strip().splitlines()[2:]:  # after the header and its rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        room = cells[0].strip("`")
        rooms[room] = {name.strip() for name in cells[2].split(",") if name.strip()}
    return rooms


def module_files() -> dict[str, str]:
    """{dotted module name: path} for every .py file of the package."""
    files = {}
    for directory, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                files[dotted.removesuffix(".__init__")] = path
    return files


def room_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """The t5lite modules `path` imports (a `from pkg import name` of a submodule counts as that submodule)."""
    found = set()
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # a submodule by name, else a name defined in `base` itself
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name == "t5lite" or name.startswith("t5lite.")}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in imports_of(module, path, set(files)):
            while name not in files:  # `import t5lite.model.config` names a module; a missing tail is an attribute
                name = name.rsplit(".", 1)[0]
            if name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_init_edge(module: str, target: str) -> bool:
    """A sub-package's __init__ that hands on its own modules' names is not an import between rooms."""
    return target.startswith(module + ".")


@pytest.fixture(scope="module")
def design_map():
    with open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8") as f:
        return read_map(f.read())


def test_every_room_of_the_package_is_on_the_map(design_map):
    rooms = {room_of(module) for module in module_files()}
    assert rooms - set(design_map) == set(), "add these rooms to the map in docs/design.md"
    assert set(design_map) - rooms == set(), "the map in docs/design.md names rooms that no longer exist"
    for room, allowed in design_map.items():
        assert allowed <= set(design_map), f"{room} may import unknown rooms {allowed - set(design_map)}"


def test_imports_point_down_as_the_map_says(design_map):
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            here, there = room_of(module), room_of(target)
            if here != there and there not in design_map[here] and not package_init_edge(module, target):
                wrong.append(f"{module} -> {target}")
    assert wrong == [], "imports the map in docs/design.md does not allow: " + "; ".join(sorted(wrong))


def test_no_import_circles():
    graph = {m: {t for t in ts if not package_init_edge(m, t) and not package_init_edge(t, m)}
             for m, ts in import_graph().items()}
    assert circles(graph) == []


def test_the_checker_finds_an_upward_import_and_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    rooms = read_map("<!-- map:begin -->\n| room | owns | may import |\n|---|---|---|\n"
                     "| `model` | x | errors |\n| `errors` | y | |\n<!-- map:end -->")
    assert rooms == {"model": {"errors"}, "errors": set()}


def test_nothing_in_the_repo_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    outside = re.compile(r"\.\./shared|shared/(DESIGN|STACK-NOTES)\.md")
    hits = []
    for name in tracked.stdout.split():
        if name.endswith((".py", ".md", ".toml", ".gin", ".sh", "Makefile", ".cfg", ".txt")) and name != __file__:
            path = os.path.join(ROOT, name)
            if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(__file__):
                with open(path, encoding="utf-8", errors="replace") as f:
                    if outside.search(f.read()):
                        hits.append(name)
    assert hits == [], f"files pointing outside the repo: {hits}"

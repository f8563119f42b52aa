"""Count every import statement under packages/ and report the import cycles.

Every `import` / `from ... import` counts: at module level, inside functions and under
`if TYPE_CHECKING:` (a cycle hidden there is still a cycle in the design). An edge goes from
the importing module to the module named after `from` (or `import`), or, for a name that is
itself a module (`from toolpool import _state`), to that module. Importing a submodule does not
add an edge to its parent packages: `toolpool/__init__.py` re-exports everything, which would
put every module in one cycle and hide the real ones.

    python tools/import_cycles.py            # the cycles (strongly connected components)
    python tools/import_cycles.py --max 2    # exit 1 if a cycle spans more than 2 modules
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "packages"


def modules() -> dict[str, Path]:
    """Every module of the toolpool namespace under packages/, by dotted name."""
    found: dict[str, Path] = {}
    for base in sorted(ROOT.iterdir()):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(module: str, level: int, name: str, is_package: bool) -> str:
    if not level:
        return name
    parts = module.split(".")
    if not is_package:
        parts.pop()
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, name] if name else parts)


def edges(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the known modules it imports, from every import statement."""
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, node.level, node.module or "", is_package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in known else base)
            for target in targets:
                if target in known and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
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
    return sorted(found, key=len, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, help="fail if a cycle spans more modules than this")
    args = parser.parse_args()
    known = modules()
    graph = edges(known)
    found = cycles(graph)
    total = sum(len(targets) for targets in graph.values())
    print(f"{len(known)} modules, {total} import edges, {len(found)} cycles")
    for component in found:
        print(f"  {len(component)} modules: {', '.join(component)}")
    largest = len(found[0]) if found else 0
    print(f"largest cycle: {largest} modules")
    if args.max is not None and largest > args.max:
        print(f"FAIL: a cycle spans more than {args.max} modules", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The import graph runs one way: contracts <- tokenizer <- pipelines <- training <- the application.

Every import counts, the ones inside functions too (a lazy import is still a dependency); only imports for
annotations (under `if TYPE_CHECKING:`) do not. A change that makes a
lower layer import a higher one, or closes a circle between modules, fails here with the imports to undo.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("codistill", "tokenizer", "pipelines", "training")
# The application: commands, runs and experiment reports, built on everything else.
APPLICATION = {"codistill.cli", "codistill.run", "codistill.experiment", "codistill.plans", "codistill.claims",
               "codistill.analysis", "codistill.verify"}
# Lower layers first; the contracts are the rest of codistill/ (configs, registry, manifests, shards, storage).
LAYERS = ("contracts", "tokenizer", "pipelines", "training", "application")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def layer(module: str) -> int:
    if module in APPLICATION:
        return LAYERS.index("application")
    top = module.split(".")[0]
    return LAYERS.index("contracts" if top == "codistill" else top)


def runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (imports for annotations only, never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def imports(module: str) -> set[str]:
    """The project's modules `module` imports (`from pkg import mod` names the module `pkg.mod`)."""
    found = set()
    for node in runtime_nodes(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_runs_back_up():
    upward = [f"{module} ({LAYERS[layer(module)]}) imports {name} ({LAYERS[layer(name)]})"
              for module, names in sorted(GRAPH.items()) for name in sorted(names) if layer(name) > layer(module)]
    assert not upward, "\n".join(upward)


def test_no_circle():
    assert not circles(GRAPH), circles(GRAPH)


def test_the_contracts_import_neither_pipelines_nor_training():
    contracts = {m: {n for n in names if n.startswith(("pipelines", "training"))} for m, names in GRAPH.items()
                 if layer(m) == 0}
    assert not any(contracts.values()), {m: names for m, names in contracts.items() if names}


def external_imports(module: str) -> set[str]:
    """The top-level names of the libraries `module` imports."""
    return {name.split(".")[0] for node in runtime_nodes(ast.parse(MODULES[module].read_text()))
            for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if name and name.split(".")[0] not in PACKAGES}


def test_the_tokenizer_is_sentencepiece_only():
    """tokenizer/ trains and applies sentencepiece models: no Beam, torch or DeepSpeed behind it."""
    heavy = {m: external_imports(m) & {"apache_beam", "torch", "deepspeed"} for m in MODULES
             if m.startswith("tokenizer")}
    assert not any(heavy.values()), heavy


def test_the_checks_see_what_they_must():
    """The checker itself: a circle and an upward import it must report."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("codistill.dataset") < layer("pipelines.run") < layer("training.train") < layer("codistill.cli")
    assert "pipelines.run" in GRAPH["pipelines.criteo"] and "codistill.storage" in GRAPH["codistill.shards"]

"""The pip requirements a remote Beam worker needs for one dataset's pipeline (Dataflow `--requirements_file`,
a Flink/Spark SDK container's `pip install -r`).

Read from the code, not kept by hand: every module of this package that the dataset's pipeline module loads or
reaches through its imports (module-level and inside functions, as a worker may run either), and every other
distribution those modules import, pinned at the version installed here (this package's own pins). Beam
itself is left out: the worker's SDK container brings it, at the version its `--sdk_container_image` has.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

from codistill.datasets import DATASETS
from codistill.extras import THIS

PACKAGES = ("codistill", "pipelines", "tokenizer", "training")  # this distribution's top-level packages
WORKER_PROVIDED = {"apache-beam"}


def extra_requirements(extra: str) -> list[str]:
    """The requirement lines of one of this package's extras."""
    if extra not in (importlib.metadata.metadata(THIS).get_all("Provides-Extra") or []):
        raise ValueError(f"{THIS} has no extra {extra!r}")
    lines = []
    for line in importlib.metadata.requires(THIS) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": extra}):
            requirement.marker = None
            lines.append(str(requirement))
    return lines


def _source(module: str) -> Path | None:
    """The source file of one of this package's modules, found without importing it (or its parents); None
    when `module` is a name inside a module (`from a import b`, `b` a function)."""
    top, *rest = module.split(".")
    base = Path(importlib.util.find_spec(top).origin).parent.joinpath(*rest)
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def optional_imports(tree: ast.AST) -> set[int]:
    """ids of the nodes under `with contextlib.suppress(ImportError):` or `try: ... except ImportError:` (a
    library used where it is installed, as storage's error types of S3 and HTTP clients): no requirement."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            optional = any("suppress(ImportError" in ast.unparse(item.context_expr) for item in node.items)
        elif isinstance(node, ast.Try):
            optional = any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers)
        else:
            continue
        if optional:
            guarded |= {id(n) for child in node.body for n in ast.walk(child)}
    return guarded


def imports_of(source: Path) -> set[str]:
    """The absolute module names a source file requires (for `from a import b`, both `a` and `a.b`), those
    inside functions included (a worker may run them), those guarded by ImportError left out."""
    tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
    optional = optional_imports(tree)
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _loaded_modules(module: str, packages: tuple[str, ...]) -> list[str]:
    """This package's modules that importing `module` loads, in a fresh interpreter (this one has loaded others):
    with those imported by name at run time (`codistill.datasets` loads every dataset spec so)."""
    listing = (f"import importlib, sys; importlib.import_module({module!r}); "
               f"print(*(m for m in sys.modules if m.split('.')[0] in {packages!r}))")
    found = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, check=True)
    return found.stdout.split()


def imported_distributions(module: str) -> set[str]:
    """The distributions (other than this one) imported by `module` and the modules of this package it reaches
    (and of `module`'s own package: a dataset plugin's, shipped to the workers as this one is)."""
    packages = (*PACKAGES, module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    seen, todo, distributions = set(), _loaded_modules(module, packages), set()
    while todo:
        source = _source(todo.pop())
        if source is None or source in seen:
            continue
        seen.add(source)
        for imported in imports_of(source):
            top = imported.split(".")[0]
            if top in packages:
                todo.append(imported)
            elif top not in sys.stdlib_module_names and top != "__future__":
                distributions.update(owners.get(top, ()))
    return distributions - {THIS}


def worker_requirements(dataset: str, extras: tuple[str, ...] = ()) -> list[str]:
    """Sorted requirement lines for the workers of `dataset`'s pipeline, plus those of `extras` (e.g. `gcs` for
    gs:// inputs)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}")
    wanted = [r for extra in extras for r in extra_requirements(extra)]
    pinned = [f"{d}=={importlib.metadata.version(d)}"
              for d in imported_distributions(DATASETS[dataset].pipeline) - WORKER_PROVIDED]
    return sorted({*pinned, *wanted}, key=str.lower)

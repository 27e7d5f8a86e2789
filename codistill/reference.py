"""The manifest field reference (docs/reference.md), generated from the config classes so it cannot go stale.

Every section of an experiment manifest, with each field's type, default and the comment beside or above its
declaration. `python -m codistill.reference > docs/reference.md` writes it; tests/test_reference.py checks that
the file is what this prints.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
from collections.abc import Iterator

from codistill import config
from codistill.datasets import DATASETS

# Fields whose value is another section (documented as its own table) or its dataset's choice.
NESTED = {("data", "synth"), ("data", "options"), ("experiment", "model")}


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, or else the comment lines right above it."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for number, line in enumerate(lines, 1):
        name = line.strip().split(":", 1)[0]
        if not line.startswith("    ") or line.startswith("     ") or name not in {f.name for f in
                                                                                 dataclasses.fields(cls)}:
            continue
        if number in comments and not line.strip().startswith("#"):
            found[name] = comments[number]
            continue
        above, row = [], number - 1
        while row in comments and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        if above:
            found[name] = " ".join(above)
    return found


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    return f"`{value!r}`"


def table(title: str, cls: type, owner: str) -> Iterator[str]:
    yield f"### `{title}`"
    yield ""
    doc = inspect.getdoc(cls)
    if doc and not doc.startswith(f"{cls.__name__}("):  # a dataclass's generated signature says nothing more
        yield doc.split("\n\n")[0].replace("\n", " ")
        yield ""
    yield "| field | type | default | what it is |"
    yield "|---|---|---|---|"
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if (owner, f.name) in NESTED:
            continue
        kind = str(f.type).replace("|", "\\|")
        note = comments.get(f.name, "").replace("|", "\\|")
        yield f"| `{f.name}` | `{kind}` | {default_text(f).replace('|', chr(92) + '|')} | {note} |"
    yield ""


def reference() -> str:
    lines = ["# Manifest field reference", "",
             "Generated from the config classes by `python -m codistill.reference > docs/reference.md`; "
             "tests/test_reference.py fails when it is stale. How manifests are read and overridden: "
             "[design.md](design.md#experiment-manifests).", "", "## Sections of every manifest", ""]
    lines += table("(top level)", config.ExperimentConfig, "experiment")
    for name in ("data", "optimizer", "schedule", "deepspeed", "loader", "codistill", "eval", "train"):
        cls = {f.name: f for f in dataclasses.fields(config.ExperimentConfig)}[name].default_factory
        lines += table(name, cls, name)
    lines += table("storage[]", config.StorageConfig, "storage")
    for name, spec in DATASETS.items():
        lines += [f"## Dataset `{name}` (`data.dataset: {name}`)", "", spec.summary + ".", ""]
        lines += table(f"data.{name}", spec.config, name)
        lines += table("data.synth", spec.synth, name)
        for model in spec.models:
            lines += table(f"model (kind: {model.__dataclass_fields__['kind'].default})", model, name)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")

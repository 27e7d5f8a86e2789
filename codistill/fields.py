"""Typed, validated dataclasses from YAML data: the field helpers every config section and plan uses.

`build(cls, raw, name)` checks a mapping against a dataclass's annotations and
builds it; every error names the dotted field it is about
(`data.groups: must be >= 1, got 0`). Two kinds of field choose their
dataclass from data: `tagged` (by a tag inside the section, as `model.kind`,
or by a sibling field, as `data.dataset` chooses `data.synth`) and `section`
(a section whose key is a sibling's value, as `data.<dataset>`).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A manifest field is missing, unknown, of the wrong type or impossible."""


def require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother, _SHORT_REPR.maxlong = 2, 60, 60, 40


def validate(section: Any, name: str) -> None:
    """A section's own rules across its fields, if it has any (a `validate(name)` method raising ConfigError):
    types, literals and required fields are already checked by `build`."""
    if hasattr(section, "validate"):
        section.validate(name)


def bounded(value: Any) -> str:
    """A short repr for error messages: it looks at a bounded part of the value, however big it is."""
    return _SHORT_REPR.repr(value)


def plain_name(value: str, name: str) -> None:
    """A name that becomes a directory (a run, a plan, a condition): never `..`, never a path."""
    require(bool(value) and value not in (".", "..") and not any(c in value for c in "/\\")
            and value.isprintable(), name,
            f"must be a plain name (not '.' or '..', no '/' or '\\'), got {bounded(value)}")


def key_text(key: Any) -> str:
    """A manifest key as it goes into a dotted field name."""
    return key if isinstance(key, str) and len(key) <= 80 else bounded(key)


def tagged(tag: str, choices: Callable[[dict[str, Any]], dict[str, type]], *, sibling: bool = False,
           **kwargs: Any) -> Any:
    """A field whose dataclass is chosen by a tag: `model.kind` inside the section itself, or
    (sibling=True) another field of the same section, as `data.dataset` chooses `data.synth`.

    `choices(fields built so far)` gives {tag value: dataclass}; with the tag left out, the first is taken."""
    return field(metadata={"tag": tag, "choices": choices, "sibling": sibling}, **kwargs)


def section(tag: str, choices: Callable[[], dict[str, type]], **kwargs: Any) -> Any:
    """A section written under the key that a sibling field names (`data.<dataset>`), of the dataclass
    `choices()[name]`. A section under another of the choices' names is refused."""
    return field(metadata={"section": tag, "choices": choices}, **kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            require(type(None) in options, name, "must not be empty")
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(value, option, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        require(value in typing.get_args(tp), name,
                f"must be one of {list(typing.get_args(tp))}, got {bounded(value)}")
        return value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        require(isinstance(value, dict), name, f"expected a mapping, got {type(value).__name__} {bounded(value)}")
        return {coerce(k, key_tp, name): coerce(v, value_tp, f"{name}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single number stands for a one-item list
        return tuple(coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, name)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else value
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    if tp is float and isinstance(value, float):
        require(math.isfinite(value), name, f"must be a finite number, got {value}")
        return value
    # bool is an int subclass: `groups: true` must not pass as 1.
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    require(ok, name, f"expected {_type_name(tp)}, got {type(value).__name__} {bounded(value)}")
    return value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """The dataclass `cls` from the mapping `raw` (its dotted name `prefix`), fields in declaration order."""
    require(isinstance(raw, dict), prefix or "manifest", f"expected a mapping, got {type(raw).__name__}")

    def dotted(key: Any) -> str:
        return f"{prefix}.{key_text(key)}" if prefix else key_text(key)

    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    # What a field left out will be: tagged fields and sections choose by their siblings' values.
    defaults = {k: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for k, f in known.items()
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    built: dict[str, Any] = {}
    chosen_sections: dict[str, str] = {}  # key in raw -> field
    other_sections: dict[str, str] = {}  # a key another choice would use -> its tag
    for key, f in known.items():
        if "section" in f.metadata:
            tag = f.metadata["section"]
            chosen, choices = (defaults | built)[tag], f.metadata["choices"]()
            require(chosen in choices, dotted(tag), f"must be one of {list(choices)}, got {bounded(chosen)}")
            chosen_sections[chosen] = key
            other_sections |= {name: tag for name in choices if name != chosen}
            if chosen in raw:
                built[key] = build(choices[chosen], raw[chosen], dotted(chosen))
        elif key in raw and "choices" in f.metadata:
            built[key] = _coerce_tagged(raw[key], f, defaults | built, dotted(key))
        elif key in raw:
            built[key] = coerce(raw[key], hints[key], dotted(key))
        else:
            require(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
                    dotted(key), "required field is missing")
    for key in raw:
        if key in other_sections:
            tag = other_sections[key]
            raise ConfigError(f"{dotted(key)}: a section for another {tag} ({dotted(tag)} is "
                              f"{(defaults | built)[tag]!r}); remove it")
        listing = ", ".join(next((name for name, k in chosen_sections.items() if k == field_name), field_name)
                            for field_name in known)
        require(key in known or key in chosen_sections, dotted(key), f"unknown key (known: {listing})")
    return cls(**built)


def _coerce_tagged(value: Any, f: dataclasses.Field, siblings: dict, name: str) -> Any:
    """Build the dataclass that the field's tag chooses (siblings are the fields already built)."""
    tag = f.metadata["tag"]
    if value is None:
        require(f.default is None, name, "must not be empty")
        return None
    choices = f.metadata["choices"](siblings)
    if f.metadata["sibling"]:
        chosen, where = siblings.get(tag), f"{name.rsplit('.', 1)[0]}.{tag}" if "." in name else tag
    else:
        require(isinstance(value, dict), name, f"expected a mapping, got {type(value).__name__}")
        chosen, where = value.get(tag, next(iter(choices))), f"{name}.{tag}"
    require(chosen in choices, where, f"must be one of {list(choices)}, got {bounded(chosen)}")
    return build(choices[chosen], value, name)


def to_dict(config: Any) -> Any:
    """A dataclass as plain data, `section` fields under the key their tag names (what `build` reads back)."""
    if dataclasses.is_dataclass(config):
        out = {}
        for f in dataclasses.fields(config):
            key = getattr(config, f.metadata["section"]) if "section" in f.metadata else f.name
            out[key] = to_dict(getattr(config, f.name))
        return out
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config

"""Documented configuration files: any pydantic settings model written out as YAML with every key's description as a
comment above it (nested settings indented under their key), so ``cfo config NAME`` prints a complete, commented
starting point that loads back to the same settings."""

from __future__ import annotations

import textwrap

import yaml
from pydantic import BaseModel

__all__ = ["commented_yaml", "undocumented_fields"]

WIDTH = 110


def _comment(text: str, indent: str) -> list[str]:
    """``text`` (a field's description, whitespace collapsed) as ``# ...`` lines of at most ``WIDTH`` characters."""
    return [indent + "# " + line for line in textwrap.wrap(" ".join(text.split()), WIDTH - len(indent) - 2)]


def _value_lines(key: str, value, indent: str) -> list[str]:
    """``key: value`` in YAML flow style on one line (lists and mappings stay compact, as in our config files)."""
    dumped = yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return [indent + dumped[1:-1]]  # strip the outer braces of the one-key mapping


def commented_yaml(settings: BaseModel, indent: str = "") -> str:
    """``settings`` as YAML, each key preceded by its field's description as comments; nested settings models are
    written as indented blocks. ``yaml.safe_load`` of the result validates back to ``settings``."""
    lines: list[str] = []
    data = settings.model_dump(mode="json")
    for name, field in type(settings).model_fields.items():
        if field.description:
            lines += _comment(field.description, indent)
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines.append(commented_yaml(value, indent + "  ").rstrip("\n"))
        else:
            lines += _value_lines(name, data[name], indent)
    return "\n".join(lines) + "\n"


def undocumented_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``model`` (and of its nested settings models) that have no description."""
    missing = []
    for name, field in model.model_fields.items():
        if not field.description:
            missing.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            missing += undocumented_fields(ann, prefix + name + ".")
    return missing

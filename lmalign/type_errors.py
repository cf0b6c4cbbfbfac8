"""pydantic's type errors of a composed config, as lmalign's problem lines: the key, the value
received, the type allowed (named as a user writes it) and an example fix."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from pydantic import ValidationError

from lmalign.errors import problem
from lmalign.schema import Config


def _walk(loc: tuple) -> tuple[list[str], Any, type | None]:
    """Follow an error location through the schema: (dotted key parts, annotation, owning class).

    Stops at pydantic's union-member tags ('int', 'list[int]'), which are not config keys.
    """
    parts: list[str] = []
    annotation: Any = Config
    owner: type | None = None
    for element in loc:
        cls = _dataclass_in(annotation)
        if cls is not None and isinstance(element, str):
            hints = typing.get_type_hints(cls)
            owner = cls
            parts.append(element)
            if element not in hints:
                return parts, None, owner
            annotation = hints[element]
        elif isinstance(element, int) or _is_mapping(annotation):
            parts.append(str(element))
            annotation = _item_type(annotation)
        else:
            break
    return parts, annotation, owner


def _dataclass_in(annotation: Any) -> type | None:
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _is_mapping(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


def _item_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[-1] if args else Any


def _describe_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(_describe_type(a) for a in members)
        return text + (" or null" if type(None) in typing.get_args(annotation) else "")
    if origin is list:
        return f"a list of {_describe_type(typing.get_args(annotation)[0])}s"
    if origin is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if annotation in names:
        return names[annotation]
    if dataclasses.is_dataclass(annotation):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(annotation))
    return str(annotation)


def _example(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str(typing.get_args(annotation)[0])
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is not None and members and origin is not list and origin is not dict:
        return _example(members[0])
    return {int: "8", float: "0.0002", bool: "true", str: "NAME"}.get(annotation, "<value>")


def describe_type_errors(exc: ValidationError, container: dict[str, Any]) -> list[str]:
    problems: dict[str, str] = {}
    for err in exc.errors():
        parts, annotation, owner = _walk(err["loc"])
        key = ".".join(parts)
        if key in problems:
            continue  # a union reports once per member; one line per key is enough
        value = err["input"] if err["type"] != "missing_argument" else "<missing>"
        if err["type"] == "unexpected_keyword_argument":
            known = [f.name for f in dataclasses.fields(owner)] if owner else []
            close = difflib.get_close_matches(parts[-1], known, n=1)
            prefix = ".".join(parts[:-1])
            fix = f"did you mean {prefix}.{close[0]}?" if close else f"remove {key}"
            problems[key] = problem(
                key, value, "unknown key", f"the keys of {prefix or 'the config'}: "
                + ", ".join(known), fix)
        elif err["type"] in ("missing_argument", "missing"):
            problems[key] = problem(
                key, value, "missing", _describe_type(annotation),
                f"add `{parts[-1]}:` to the YAML option or pass +{key}=...")
        else:
            problems[key] = problem(
                key, _lookup(container, parts, err["input"]), f"not valid ({err['msg'].lower()})",
                _describe_type(annotation), f"{key}={_example(annotation)}")
    return list(problems.values())


def _lookup(container: dict, parts: list[str], fallback: Any) -> Any:
    node: Any = container
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return fallback
    return node

"""pydantic's type errors of a composed config, as lmalign's problem lines: the key, the value
received, the type allowed (named as a user writes it) and an example fix."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Collection
from typing import Annotated, Any

from pydantic import ValidationError

from lmalign.errors import problem
from lmalign.schema import Config


def _walk(loc: tuple) -> tuple[list[str], Any, type | None]:
    """Follow an error location through the schema: (dotted key parts, annotation, owning class).
    The annotation keeps its bounds (Annotated[int, Field(ge=1)]).

    Stops at pydantic's union-member tags ('int', 'list[int]'), which are not config keys.
    """
    parts: list[str] = []
    annotation: Any = Config
    owner: type | None = None
    for element in loc:
        cls = _dataclass_in(annotation)
        if cls is not None and isinstance(element, str):
            hints = typing.get_type_hints(cls, include_extras=True)
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


def _plain(annotation: Any) -> Any:
    """The type without its bounds."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated \
        else annotation


def _bounds(annotation: Any) -> list[tuple[str, Any]]:
    """(">=", 1) and the like, from Field(ge=1, ...)."""
    if typing.get_origin(annotation) is not Annotated:
        return []
    found = []
    for meta in typing.get_args(annotation)[1:]:
        for item in getattr(meta, "metadata", [meta]):
            for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                if getattr(item, name, None) is not None:
                    found.append((symbol, getattr(item, name)))
    return found


def _satisfies(value: float, bounds: list[tuple[str, Any]]) -> bool:
    checks = {">=": value.__ge__, ">": value.__gt__, "<=": value.__le__, "<": value.__lt__}
    return all(checks[symbol](limit) for symbol, limit in bounds)


def _dataclass_in(annotation: Any) -> type | None:
    annotation = _plain(annotation)
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _is_mapping(annotation: Any) -> bool:
    return typing.get_origin(_plain(annotation)) is dict


def _item_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(_plain(annotation)) if a is not type(None)]
    return args[-1] if args else Any


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _describe_type(annotation: Any) -> str:
    bounds = _bounds(annotation)
    if bounds:
        return f"{_describe_type(_plain(annotation))} " + " and ".join(
            f"{symbol} {limit}" for symbol, limit in bounds)
    annotation = _plain(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(_describe_type(a) for a in members)
        return text + (" or null" if type(None) in typing.get_args(annotation) else "")
    if origin is list:
        item = typing.get_args(annotation)[0]
        bounds = " and ".join(f"{symbol} {limit}" for symbol, limit in _bounds(item))
        plural = _PLURALS.get(_plain(item))
        return (f"a list of {plural}{' ' + bounds if bounds else ''}" if plural
                else f"a list of {_describe_type(item)}") + (
            ", or one of them" if item is str else "")
    if origin is dict:
        return "a mapping"
    if annotation in _NAMES:
        return _NAMES[annotation]
    if dataclasses.is_dataclass(annotation):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(annotation))
    return str(annotation)


def _example(annotation: Any, received: Any = None) -> str:
    """A value the annotation allows: the closest choice to what was received, else a typical
    one within the bounds."""
    bounds = _bounds(annotation)
    annotation = _plain(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = [str(a) for a in typing.get_args(annotation)]
        close = difflib.get_close_matches(str(received), choices, n=1)
        return close[0] if close else choices[0]
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        return f"[{_example(typing.get_args(annotation)[0])}]"
    if origin is not None and members and origin is not dict:
        return _example(members[0], received)
    typical = {int: 8, float: 0.0002, bool: "true", str: "NAME"}.get(annotation, "<value>")
    if bounds and isinstance(received, (int, float)) and not isinstance(received, bool):
        typical = _nearest_within(received, bounds, annotation)  # -1 where >= 0: 0
    if bounds and isinstance(typical, (int, float)) and not _satisfies(typical, bounds):
        typical = next(limit for symbol, limit in bounds if symbol in (">=", "<="))
    return str(typical)


def _nearest_within(value: float, bounds: list[tuple[str, Any]], kind: Any) -> Any:
    """The allowed value closest to one outside the bounds (a typical one for an open bound)."""
    if kind is int:
        value = round(value)
    for symbol, limit in bounds:
        if symbol == ">=" and value < limit or symbol == "<=" and value > limit:
            value = limit
        elif symbol == ">" and value <= limit:
            value = limit + 1 if kind is int else {int: 8, float: 0.0002}.get(kind, limit)
        elif symbol == "<" and value >= limit:
            value = limit - 1 if kind is int else limit
    return value


def describe_type_errors(exc: ValidationError, container: dict[str, Any],
                         following: Collection[str] = ()) -> list[str]:
    """One line per key; `following` keys (another key's value, interpolated) are left out
    when that other key is reported too."""
    problems: dict[str, str] = {}
    errors = exc.errors()
    # A union reports once per member; one line per key is enough, from the member that got
    # furthest into the value (a list given where int | list[int] goes: the list's error).
    deepest: dict[str, Any] = {}
    for err in errors:
        key = ".".join(_walk(err["loc"])[0])
        if key not in deepest or len(err["loc"]) > len(deepest[key]["loc"]):
            deepest[key] = err
    for key, err in deepest.items():
        parts, annotation, owner = _walk(err["loc"])
        if key in following and len(deepest) > 1:
            continue
        value = err["input"] if err["type"] not in ("missing_argument", "missing") \
            else "<missing>"
        if err["type"] == "unexpected_keyword_argument":
            known = [f.name for f in dataclasses.fields(owner)] if owner else []
            close = close_names(parts[-1], known)
            prefix = ".".join(parts[:-1])
            fix = ("did you mean " + " or ".join(f"{prefix}.{c}" for c in close) + "?") if close \
                else f"remove {key}"
            problems[key] = problem(
                key, value, "unknown key", f"the keys of {prefix or 'the config'}: "
                + ", ".join(known), fix)
        elif err["type"] in ("missing_argument", "missing"):
            problems[key] = problem(
                key, value, "missing", _describe_type(annotation),
                f"add `{parts[-1]}:` to the YAML option or pass +{key}=...")
        else:
            received = _lookup(container, parts, err["input"])
            problems[key] = problem(
                key, received, f"not valid ({err['msg'].lower()})",
                _describe_type(annotation), f"{key}={_example(annotation, received)}")
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


def close_names(word: str, names: list[str]) -> list[str]:
    """The closest name, and a second one when it is about as close (method.rewarsd: reward or
    rewards), for a "did you mean" fix."""
    found = difflib.get_close_matches(word, names, n=2)
    if len(found) < 2:
        return found
    ratio = [difflib.SequenceMatcher(None, word, name).ratio() for name in found]
    return found if ratio[1] >= ratio[0] - 0.1 else found[:1]

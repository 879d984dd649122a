"""Collect every error of a raw mapping against a msgspec Struct type, each with its dotted path.

msgspec stops at the first error; an operator fixing a config file wants them all at once, worded as
``queue.levels[1].max_wait_time: invalid duration "5 sec"``. A value that may be a secret is never shown:
its line names the path and the kind of value only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec.inspect as mi


def check(
    value: Any,
    tp: type,
    *,
    duration_type: type,
    parse_duration: Callable[[str], float],
    secret: Callable[[str], bool],
) -> list[str]:
    """Return ``path: reason`` for each problem of ``value`` as an instance of ``tp`` (empty when valid).
    Values at paths for which ``secret`` is true are not quoted in the reasons."""
    problems: list[str] = []

    def walk(v: Any, t: mi.Type, path: str) -> None:
        where = path or "<root>"
        hide = secret(path)
        match t:
            case mi.StructType():
                if not isinstance(v, dict):
                    problems.append(f"{where}: expected a mapping, got {_kind(v, hide)}")
                    return
                names = {f.encode_name: f for f in t.fields}
                for key in v:
                    if key not in names:
                        expected = ", ".join(sorted(names))
                        problems.append(f"{_join(path, str(key))}: unknown field (expected one of: {expected})")
                for name, field in names.items():
                    if name in v:
                        walk(v[name], field.type, _join(path, name))
                    elif field.required:
                        problems.append(f"{_join(path, name)}: required field is missing")
            case mi.UnionType():
                if v is None and any(isinstance(u, mi.NoneType) for u in t.types):
                    return
                inner = [u for u in t.types if not isinstance(u, mi.NoneType)]
                if len(inner) == 1:
                    walk(v, inner[0], path)
                    return
                reasons: list[str] = []  # of a value that is one of several kinds ("auto" or a number)
                for u in inner:
                    before = len(problems)
                    walk(v, u, path)
                    if len(problems) == before:
                        return  # one alternative fits
                    reasons += [p.removeprefix(f"{where}: ") for p in problems[before:]]
                    del problems[before:]
                problems.append(f"{where}: " + " or ".join(reasons))
            case mi.ListType():
                if not isinstance(v, list):
                    problems.append(f"{where}: expected a list, got {_kind(v, hide)}")
                    return
                for i, item in enumerate(v):
                    walk(item, t.item_type, f"{path}[{i}]")
            case mi.DictType():
                if not isinstance(v, dict):
                    problems.append(f"{where}: expected a mapping, got {_kind(v, hide)}")
            case mi.IntType():
                if isinstance(v, bool) or not isinstance(v, int):
                    problems.append(f"{where}: expected an integer, got {_kind(v, hide)}")
                else:
                    _bounds(v, t, where, problems)
            case mi.FloatType():
                if isinstance(v, bool) or not isinstance(v, int | float):
                    problems.append(f"{where}: expected a number, got {_kind(v, hide)}")
                else:
                    _bounds(v, t, where, problems)
            case mi.StrType():
                if not isinstance(v, str):
                    problems.append(f"{where}: expected a string, got {_kind(v, hide)}")
            case mi.BoolType():
                if not isinstance(v, bool):
                    problems.append(f"{where}: expected true or false, got {_kind(v, hide)}")
            case mi.LiteralType():
                if v not in t.values:
                    allowed = ", ".join(str(x) for x in t.values)
                    problems.append(f"{where}: unknown value {_show(v, hide)} (expected one of: {allowed})")
            case mi.CustomType() if t.cls is duration_type:
                if not _is_duration(v, parse_duration):
                    problems.append(f'{where}: invalid duration {_show(v, hide)} (write it like "100ms", "30s", "5m")')
            case _:
                pass

    walk(value, mi.type_info(tp), "")
    return problems


def _is_duration(v: Any, parse_duration: Callable[[str], float]) -> bool:
    if not isinstance(v, str):
        return False
    try:
        parse_duration(v)
    except ValueError:
        return False
    return True


def _bounds(v: float, t: mi.IntType | mi.FloatType, where: str, problems: list[str]) -> None:
    if t.ge is not None and v < t.ge:
        problems.append(f"{where}: {v} must be >= {t.ge}")
    if t.le is not None and v > t.le:
        problems.append(f"{where}: {v} must be <= {t.le}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(v: Any, hide: bool) -> str:
    if v is None:
        return "null"
    return f"{type(v).__name__} {_show(v, hide)}"


def _show(v: Any, hide: bool) -> str:
    if hide:
        return "(value not shown: it may be a secret)"
    text = f'"{v}"' if isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."

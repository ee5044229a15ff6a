"""Reading one field of an OpenAI request body: present or not, of the right type,
in range, with a 400 that names it."""
from __future__ import annotations

import math

from llmesh.services.router.http_api.errors import invalid

_MISSING = object()


def _get(body: dict, name: str):
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise invalid(name, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(name, "is not valid UTF-8 (lone surrogate)") from None
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = _get(body, name)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        raise invalid(name, "must be true or false")
    return value


def _int(body: dict, name: str, lo: int, hi: int):
    value = _get(body, name)
    if value is _MISSING:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, "must be an integer")
    if not lo <= value <= hi:
        raise invalid(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _number(body: dict, name: str, lo: float, hi: float):
    value = _get(body, name)
    if value is _MISSING:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, "must be a finite number")
    if not lo <= value <= hi:
        raise invalid(name, f"must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)

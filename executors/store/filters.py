"""Metadata filters -> a SQL condition over the indexer's ``rows`` table.

A filter is a dict. Each key is a stored column (``uri``, ``mtime``, ``size``, ``width``,
``height``, ``indexed_at``, ``taken`` (when the picture was taken), ``taken_from``, ``camera``,
``latitude``, ``longitude``) or a tag (``tags.NAME``, or plain ``NAME`` when it is no
column). Each value is either a scalar (equality) or a dict of operators:
``$eq $ne $gt $gte $lt $lte $in $nin``. Several keys and operators all must hold.

A tag a row lacks, a tag stored as JSON null and an empty column are all "no value", and:

- ``null`` (``{"label": null}``, ``{"$eq": null}``, or ``null`` in an ``$in`` list) matches a row with no
  value; ``{"$ne": null}`` (or ``null`` in a ``$nin`` list) matches the rows that have one.
- ``$ne`` and ``$nin`` with values match a row with no value, as MongoDB's do: ``{"label": {"$ne": "cat"}}``
  is every row that is not labelled "cat", unlabelled rows included (SQL's ``!=`` and ``NOT IN`` alone would
  silently drop them).
- ``$eq``, ``$in`` and the ranges ``$gt $gte $lt $lte`` never match a row with no value.

    {"label": "cat", "width": {"$gte": 640}, "mtime": {"$gte": 1.7e9, "$lt": 1.8e9}}

Dates in ranges may be ISO strings ("2024-05-01") or epoch seconds; they are compared
with ``mtime`` / ``indexed_at`` as epoch seconds.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any, List, Mapping, Tuple

COLUMNS = ("uri", "mtime", "size", "width", "height", "indexed_at", "content_hash", "taken", "taken_from", "camera",
           "latitude", "longitude")
DATE_COLUMNS = ("mtime", "indexed_at", "taken")
_OPS = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_TAG_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class FilterError(ValueError):
    """A malformed filter; the message names the bad part."""


def to_sql(spec: Mapping[str, Any] | None) -> Tuple[str, List[Any]]:
    """(condition, parameters); an empty filter is ``("1", [])``."""
    if not spec:
        return "1", []
    if not isinstance(spec, Mapping):
        raise FilterError(f"filter must be a JSON object of field: condition, got {type(spec).__name__}")
    parts: List[str] = []
    params: List[Any] = []
    for key, cond in spec.items():
        column = _column(key)
        ops = cond if isinstance(cond, Mapping) else {"$eq": cond}
        if not ops:
            raise FilterError(f"filter on {key!r}: empty condition")
        for op, value in ops.items():
            if op in ("$in", "$nin"):
                if not isinstance(value, (list, tuple)) or not value:
                    raise FilterError(f"filter on {key!r}: {op} needs a non-empty list, got {value!r}")
                values = [_value(key, op, v) for v in value]
                present = [v for v in values if v is not None]
                listed = f"{column} {'NOT ' if op == '$nin' else ''}IN ({', '.join('?' * len(present))})"
                if op == "$in":  # null in the list: rows with no value match too
                    terms = ([listed] if present else []) + ([f"{column} IS NULL"] if len(present) < len(values) else [])
                    parts.append(f"({' OR '.join(terms)})")
                elif len(present) < len(values):  # $nin with null: only rows with a value, outside the list
                    parts.append(f"({column} IS NOT NULL AND {listed})" if present else f"{column} IS NOT NULL")
                else:  # $nin: rows with no value match
                    parts.append(f"({column} IS NULL OR {listed})")
                params.extend(present)
            elif op in ("$eq", "$ne") and value is None:
                parts.append(f"{column} IS {'NOT ' if op == '$ne' else ''}NULL")
            elif op == "$ne":  # rows with no value match
                parts.append(f"({column} IS NULL OR {column} != ?)")
                params.append(_value(key, op, value))
            elif op in _OPS:
                parts.append(f"{column} {_OPS[op]} ?")
                params.append(_value(key, op, value))
            else:
                raise FilterError(f"filter on {key!r}: unknown operator {op!r} (use one of {', '.join([*_OPS, '$in', '$nin'])})")
    return " AND ".join(parts), params


def _column(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise FilterError(f"filter field must be a non-empty string, got {key!r}")
    if key.startswith("tags."):
        name = key[5:]
    elif key in COLUMNS:
        return key
    else:
        name = key
    if not _TAG_NAME.match(name):
        raise FilterError(f"filter field {key!r}: tag names may hold letters, digits, '_' and '-' only")
    return f"json_extract(tags, '$.\"{name}\"')"


def _value(key: str, op: str, value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if key in DATE_COLUMNS and isinstance(value, str):
        try:
            parsed = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise FilterError(f"filter on {key!r}: {op} value {value!r} is neither epoch seconds nor an ISO date") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=_dt.timezone.utc)
        return parsed.timestamp()
    if isinstance(value, (int, float, str)) or value is None:
        return value
    raise FilterError(f"filter on {key!r}: {op} value must be a number or a string, got {type(value).__name__}")

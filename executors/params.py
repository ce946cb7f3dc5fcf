"""Shared by all executors: request parameters over constructor defaults, document traversal, and the
one reading of a boolean flag and of a dtype name, wherever they arrive from (YAML, environment, request)."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Type


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_threads(cap: int = 8) -> int:
    """Threads for a pool of CPU work: the CPUs this process may run on, at most ``cap``."""
    return max(1, min(cap, usable_cpus()))


def request_options(defaults: Mapping[str, Any], parameters: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Constructor defaults, overridden by a request's ``parameters`` under the same names.

    Parameters the executor does not know are ignored (a Flow sends every parameter to every
    executor); a known one set to None keeps the default.
    """
    options = dict(defaults)
    for key, value in (parameters or {}).items():
        if key in options and value is not None:
            options[key] = value
    return options


def traverse(docs, access_paths: str):
    """The documents at ``access_paths``: ``@r`` (or empty) for the root documents,
    else a docarray access path such as ``matches`` or ``chunks``."""
    path = (access_paths or "@r").strip()
    if path in ("@r", "r", ""):
        return list(docs)
    path = path.lstrip("@")
    try:
        return list(docs.traverse_flat(path))
    except (AttributeError, KeyError, ValueError) as e:
        raise ValueError(f"access_paths {access_paths!r} does not name a field of these documents ({e})") from None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def as_flag(value: Any, name: str = "flag") -> bool:
    """A boolean as it may arrive from YAML, an environment variable or request parameters
    (protobuf turns ``true`` into ``True`` and numbers into floats): 1/true/yes/on or 0/false/no/off."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError(f"{name} must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE[:-1])}, got {value!r}")
    return bool(value)


# Every spelling of a dtype clipseek takes -> its one name.
DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "int8": "int8", "qint8": "int8",
    "auto": "auto",
}


def dtype_name(value: Any, allowed: Sequence[str], *, what: str = "dtype",
               error: Type[Exception] = ValueError) -> str:
    """The name in ``allowed`` that ``value`` spells (``fp16``, ``torch.bfloat16``, ``numpy.float32``,
    a numpy or torch dtype ...); anything else raises ``error`` naming the choices."""
    if isinstance(value, type):  # numpy.float16 and the like
        value = value.__name__
    text = str(getattr(value, "name", None) or value).lower().replace("torch.", "").replace("numpy.", "").strip()
    name = DTYPE_ALIASES.get(text)
    if name not in allowed:
        raise error(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return name

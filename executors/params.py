"""Shared by all executors: the request parameters that may override constructor defaults, document traversal, and the
one reading of a boolean flag and of a dtype name, wherever they arrive from (YAML, environment, request)."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Type


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_threads(cap: int = 8) -> int:
    """Threads for a pool of CPU work: the CPUs this process may run on, at most ``cap``."""
    return max(1, min(cap, usable_cpus()))


MAX_LIMIT = 10_000  # the most results one query may ask for


class RequestError(ValueError):
    """A request's ``parameters`` name an option a request may not set, or a value out of its bound."""


# Options fixed when the server starts, and what sets each: the `clipseek serve` flag where there is one,
# else the flow YAML's ``uses_with``. A request naming one is refused with this text.
SERVER_OPTIONS = {
    "pretrained_model_name_or_path": "clipseek serve --model",
    "device": "clipseek serve --device",
    "dtype": "clipseek serve --dtype",
    "max_megapixels": "clipseek serve --max-megapixels",
    "allowed_roots": "clipseek serve --allow-root",
    "allow_private_urls": "clipseek serve --allow-private-urls",
    "url_timeout": "clipseek serve --url-timeout",
    "max_download_bytes": "clipseek serve --max-download-bytes",
    "num_workers": "the flow YAML's uses_with",
    "model_streams": "the flow YAML's uses_with",
    "index_dir": "the flow YAML's uses_with",
    "storage_dtype": "the flow YAML's uses_with",
    "chunk_rows": "the flow YAML's uses_with",
    "read_only": "the flow YAML's uses_with",
}


def request_options(defaults: Mapping[str, Any], parameters: Optional[Mapping[str, Any]],
                    settable: Mapping[str, Callable[[Any, Any], Any]]) -> Dict[str, Any]:
    """Constructor defaults, overridden by a request's ``parameters`` for the names in ``settable`` only.

    ``settable`` maps each option a request may set to a check ``(value, default) -> value`` that
    converts the value or raises ValueError; a request may never widen a bound the server was started
    with (``at_most_default``). A parameter in ``SERVER_OPTIONS`` (model, device, precision, every safety
    limit) raises RequestError naming it and what sets it. Other parameters are ignored (a Flow sends
    every parameter to every executor); a settable one set to None keeps the default.
    """
    options = dict(defaults)
    for key, value in (parameters or {}).items():
        if key in SERVER_OPTIONS:
            raise RequestError(f"parameter {key!r} is fixed when the server starts ({SERVER_OPTIONS[key]}); "
                               f"a request cannot set it")
        if key in settable and value is not None:
            try:
                options[key] = settable[key](value, defaults.get(key))
            except RequestError:
                raise
            except (TypeError, ValueError) as e:
                raise RequestError(f"parameter {key!r}: {e}") from None
    return options


def as_int(low: int, high: int) -> Callable[[Any, Any], int]:
    """A check for an integer in [low, high] (protobuf sends every number as a float)."""
    def check(value: Any, default: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"must be an integer, got {value!r}")
        number = float(value)
        if number != int(number) or not low <= number <= high:
            raise ValueError(f"must be an integer from {low} to {high}, got {value!r}")
        return int(number)
    return check


def at_most_default(low: int = 1) -> Callable[[Any, Any], int]:
    """A check for an integer from ``low`` up to the server's own value: a request may lower it, not raise it."""
    def check(value: Any, default: Any) -> int:
        return as_int(low, int(default))(value, default)
    return check


def as_float(low: float = -math.inf, high: float = math.inf) -> Callable[[Any, Any], float]:
    def check(value: Any, default: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"must be a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number) or not low <= number <= high:
            raise ValueError(f"must be a number from {low:g} to {high:g}, got {value!r}")
        return number
    return check


def as_text(max_chars: int = 1000) -> Callable[[Any, Any], str]:
    def check(value: Any, default: Any) -> str:
        if not isinstance(value, str) or len(value) > max_chars:
            raise ValueError(f"must be a string of at most {max_chars} characters, got {str(value)[:40]!r}")
        return value
    return check


def as_bool(value: Any, default: Any) -> bool:
    return as_flag(value)


def as_any(value: Any, default: Any) -> Any:
    """For values checked where they are used (filters, id lists)."""
    return value


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

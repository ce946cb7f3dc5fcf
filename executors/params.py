"""Request parameters over constructor defaults, and document traversal: shared by all executors."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional


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

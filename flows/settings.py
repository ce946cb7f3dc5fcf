"""Settings shared by the CLI, the client and the servers: flags over environment over defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from executors.params import as_flag

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL_DIR = os.path.join(PROJECT_ROOT, "data", "models", "clipseek-demo")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_INDEX_PORT = 51000
DEFAULT_SEARCH_PORT = 51001
DEFAULT_WEB_PORT = 51002
# Images per /index request: several of the encoder's model batches (32), so that its decoding pool runs
# ahead of the model for most of a request (benchmarks/index_throughput.py, 1 torch thread: 0.86 of the
# raw model's images/s at 64 per request, 0.94 at 256).
DEFAULT_REQUEST_SIZE = 256


def _env(name: str, default=None):
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    value = _env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _env_paths(name: str) -> Optional[List[str]]:
    """An os.pathsep-separated list of folders, or None when the variable is unset or empty."""
    value = _env(name)
    if value is None:
        return None
    return [os.path.abspath(os.path.expanduser(p)) for p in value.split(os.pathsep) if p]


@dataclass
class Settings:
    """Where the flows listen and what they run. Every field has a flag and an environment variable."""

    host: str = field(default_factory=lambda: _env("CLIPSEEK_HOST", DEFAULT_HOST))
    index_port: int = field(default_factory=lambda: _env_int("CLIPSEEK_INDEX_PORT", DEFAULT_INDEX_PORT))
    search_port: int = field(default_factory=lambda: _env_int("CLIPSEEK_SEARCH_PORT", DEFAULT_SEARCH_PORT))
    web_port: int = field(default_factory=lambda: _env_int("CLIPSEEK_WEB_PORT", DEFAULT_WEB_PORT))
    model: Optional[str] = field(default_factory=lambda: _env("CLIPSEEK_MODEL"))
    device: Optional[str] = field(default_factory=lambda: _env("CLIPSEEK_DEVICE"))
    dtype: Optional[str] = field(default_factory=lambda: _env("CLIPSEEK_DTYPE"))
    batch_size: Optional[int] = field(default_factory=lambda: _env_int("CLIPSEEK_BATCH_SIZE", None))
    max_megapixels: Optional[float] = field(default_factory=lambda: float(_env("CLIPSEEK_MAX_MEGAPIXELS", 0)) or None)
    # Per URL the server fetches: seconds before it gives up, and the most bytes it reads (None: the encoder's 10 s, 50 MiB).
    url_timeout: Optional[float] = field(default_factory=lambda: float(_env("CLIPSEEK_URL_TIMEOUT", 0)) or None)
    max_download_bytes: Optional[int] = field(default_factory=lambda: _env_int("CLIPSEEK_MAX_DOWNLOAD_BYTES", None))
    allow_private_urls: bool = field(default_factory=lambda: as_flag(_env("CLIPSEEK_ALLOW_PRIVATE_URLS", ""),
                                                                      "CLIPSEEK_ALLOW_PRIVATE_URLS"))
    shards: Optional[int] = field(default_factory=lambda: _env_int("CLIPSEEK_SHARDS", None))
    workspace: str = field(default_factory=lambda: _env("CLIPSEEK_WORKSPACE", os.path.join(PROJECT_ROOT, "workspace")))
    # Folders the index flow may read local paths from (None: anywhere, for a laptop). --allow-root DIR.
    allowed_roots: Optional[List[str]] = field(default_factory=lambda: _env_paths("CLIPSEEK_ALLOWED_ROOTS"))

    @property
    def index_address(self) -> str:
        return f"grpc://{client_host(self.host)}:{self.index_port}"

    @property
    def search_address(self) -> str:
        return f"grpc://{client_host(self.host)}:{self.search_port}"


def client_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host

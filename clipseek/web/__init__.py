"""A small web page for searching the index, served next to the flows by ``clipseek serve --web``.

Every request goes through one :class:`clipseek.client.ClipseekClient`: the page has no other way
to the flows or to the disk. Thumbnails are read only from the uri stored for an indexed id, by the
encoder's read rule (``read_local``: the allowed roots checked on the real path when the file is opened,
regular files only, size-bounded), and served only when the file's content hash is the one stored
for that id: a picture indexed from bytes is never served from a path it merely names.

The page answers only requests whose ``Host`` is the address it serves (DNS rebinding), and refuses
cross-site POSTs (``Origin``, ``Sec-Fetch-Site``) and cross-site reads of its API. Every request body
is read with a cap.

    from clipseek.client import ClipseekClient
    from clipseek.web import create_app, serve_in_thread
    server = serve_in_thread(create_app(ClipseekClient()), "127.0.0.1", 51002)
    print(server.url); ...; server.stop()
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import threading
import time
import urllib.parse
from importlib.resources import files
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from executors.images.imaging import ImageError, check_allowed_root, content_hash, local_path, read_local
from executors.images.video import MAX_VIDEO_BYTES, format_time, frame_at, split_moment
from clipseek.client import ClipseekClient, ClipseekError
from flows.settings import client_host

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_JSON_BYTES = 2**20  # a search request: a text, a filter and lists of result ids
MAX_LIMIT = 100
THUMB_SIZE = 256
THUMB_MAX_FILE_BYTES = 100 * 2**20
_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


class WebError(Exception):
    """A request the page should explain: ``status`` and a message for a person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(client: ClipseekClient, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               allowed_roots: Optional[Sequence[str]] = None, host: Optional[str] = None, port: Optional[int] = None,
               allowed_hosts: Sequence[str] = (), max_json_bytes: int = MAX_JSON_BYTES) -> FastAPI:
    """The page (``GET /``) and the JSON API it uses, all answered through ``client``.

    ``allowed_roots``: the folders thumbnails may be read from (None: anywhere), as the index flow's
    ``--allow-root``. ``host`` and ``port``: where the page is served (``serve_in_thread`` sets them);
    requests naming another ``Host`` are refused, except the names in ``allowed_hosts``."""
    app = FastAPI(title="clipseek", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # one request at a time through the client's gRPC connections
    app.state.clipseek_address = (host, port)
    app.state.clipseek_hosts = tuple(h.lower() for h in allowed_hosts)
    roots = None if allowed_roots is None else [os.path.realpath(os.path.expanduser(os.fspath(r))) for r in allowed_roots]

    @app.middleware("http")
    async def _same_site_only(request: Request, call_next):
        refusal = _refusal(request, *app.state.clipseek_address, app.state.clipseek_hosts)
        if refusal:
            logger.warning("refused %s %s: %s", request.method, request.url.path, refusal)
            return _error(403, refusal)
        return await call_next(request)

    def call(method, *args, **kwargs):
        with lock:
            return method(*args, **kwargs)

    @app.exception_handler(WebError)
    async def _web_error(request: Request, exc: WebError):
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(400, "malformed request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("web request %s failed", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = PAGE.replace("__MAX_UPLOAD_BYTES__", str(int(max_upload_bytes)))
        return HTMLResponse(html, headers={"Cache-Control": "no-store", "Content-Security-Policy": CSP})

    @app.post("/api/search")
    async def search(request: Request) -> JSONResponse:
        raw = await _read_body(request, max_json_bytes, WebError(
            413, f"the search request is larger than {max_json_bytes} bytes"))
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise WebError(400, f"the request body is not valid JSON ({e})")
        if not isinstance(body, dict):
            raise WebError(400, "the request body must be a JSON object")
        text = body.get("text") or None
        if text is not None and not isinstance(text, str):
            raise WebError(400, "text must be a string")
        text = text.strip() or None if text else None
        limit = _limit(body.get("limit"))
        where = _filter(body.get("filter"))
        like, unlike = _ids(body.get("like"), "like"), _ids(body.get("unlike"), "unlike")
        after, before, sort = _date(body.get("after"), "after"), _date(body.get("before"), "before"), body.get("sort")
        if sort not in (None, "", "score", "date"):
            raise WebError(400, "sort must be 'score' or 'date'")
        if not text and not like:
            raise WebError(400, "type something to search for, pick a result, or upload an image")
        started = time.perf_counter()
        hits = await run_in_threadpool(_search, call, client, text=text, limit=limit, filter=where,
                                       like=like, unlike=unlike, after=after, before=before, sort=sort or "score")
        return JSONResponse({"hits": hits, "seconds": round(time.perf_counter() - started, 3)})

    @app.post("/api/search-image")
    async def search_image(request: Request) -> JSONResponse:
        data, limit = await _read_upload(request, max_upload_bytes)
        _check_image(data)
        started = time.perf_counter()
        hits = await run_in_threadpool(_search, call, client, image=data, limit=limit)
        return JSONResponse({"hits": hits, "seconds": round(time.perf_counter() - started, 3)})

    @app.get("/api/thumb/{doc_id}")
    def thumb(doc_id: str) -> Response:
        if not _ID.match(doc_id):
            raise WebError(404, "no such picture")
        try:
            found = [d for d in call(client.lookup, [doc_id]) if d.found and d.id == doc_id]
        except ClipseekError as e:
            raise WebError(502, str(e))
        if not found or not found[0].uri:
            raise WebError(404, f"no indexed picture with id {doc_id}")
        record = found[0]
        uri = record.uri
        if uri.startswith(("http://", "https://")) and record.t is None:
            return RedirectResponse(uri, status_code=307)
        path = local_path(uri)
        if path is None:  # data: URIs are not kept whole; a URL video's frame is not fetched again
            raise WebError(404, f"picture {doc_id} has no file to show")
        return Response(_thumbnail(uri, path, doc_id, record.content_hash, roots, t=record.t), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300", "Cross-Origin-Resource-Policy": "same-origin"})

    @app.get("/api/video/{doc_id}")
    def video(doc_id: str) -> Response:
        """The video file of a moment (``doc_id`` is the moment's), for the page's player: only a local file
        that was indexed under that id, still the same size and modification time, under ``--allow-root``."""
        if not _ID.match(doc_id):
            raise WebError(404, "no such video")
        try:
            found = [d for d in call(client.lookup, [doc_id]) if d.found and d.id == doc_id and d.t is not None]
        except ClipseekError as e:
            raise WebError(502, str(e))
        path = local_path(found[0].uri or "") if found else None
        if path is None:
            raise WebError(404, f"no indexed video moment with id {doc_id}")
        return FileResponse(_same_file(found[0], path, roots), media_type=_video_type(path),
                            headers={"Cache-Control": "private, max-age=300", "Cross-Origin-Resource-Policy": "same-origin"})

    return app


# ---- who may ask ------------------------------------------------------------------------------
_LOOPBACK_NAMES = ("localhost",)
_WILDCARDS = ("0.0.0.0", "::", "")


def _split_host(value: str) -> Tuple[str, Optional[int]]:
    """(name, port or None) of a Host header or an Origin's netloc: ``name``, ``name:port``, ``[v6]:port``."""
    value = value.strip()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""
    if port and not port.isdigit():
        raise ValueError(value)
    return name.lower().rstrip("."), (int(port) if port else None)


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _host_allowed(value: str, host: Optional[str], port: Optional[int], extra: Sequence[str]) -> bool:
    """Whether a Host header names this page: a loopback form (localhost, 127.0.0.1, [::1]) or the host it
    is served on, on its own port. A page bound to every interface also answers its machine's name and any
    IP address (an address in the URL bar is never a rebound name); ``extra`` names more hosts."""
    try:
        name, given_port = _split_host(value)
    except ValueError:
        return False
    if port is not None and (given_port or 80) != port:
        return False
    ip = _ip(name)
    if name in _LOOPBACK_NAMES or (ip is not None and ip.is_loopback) or name in extra:
        return True
    if host is None:
        return False
    served = host.lower().strip("[]")
    if served in _WILDCARDS:
        return ip is not None or name == socket.gethostname().lower()
    served_ip = _ip(served)
    return name == served or (ip is not None and served_ip is not None and ip == served_ip)


def _refusal(request: Request, host: Optional[str], port: Optional[int], extra: Sequence[str]) -> Optional[str]:
    """Why a request is refused (403), or None. A Host that is not this page's is another site's page
    reaching it through a rebound DNS name; a POST from another origin, or any cross-site read of the
    API, is another site's page using the browser that visits it."""
    host_header = request.headers.get("host")
    if not host_header or not _host_allowed(host_header, host, port, extra):
        return (f"refused: the Host header {host_header!r} is not an address this page is served on "
                f"({'port ' + str(port) if port else 'its own port'} of localhost, 127.0.0.1, [::1] or {host or 'its host'})")
    site = (request.headers.get("sec-fetch-site") or "").lower()
    unsafe = request.method not in ("GET", "HEAD", "OPTIONS")
    if site not in ("", "same-origin", "none") and (unsafe or request.url.path.startswith("/api/")):
        return f"refused: a {site} request (Sec-Fetch-Site); this page answers its own requests only"
    origin = request.headers.get("origin")
    if unsafe and origin is not None:
        parsed = urllib.parse.urlparse(origin)
        if parsed.scheme not in ("http", "https") or parsed.netloc.lower() != host_header.strip().lower():
            return f"refused: a request from another origin ({origin}); this page answers its own requests only"
    return None


# ---- request parts --------------------------------------------------------------------------
def _limit(value: Any) -> int:
    if value in (None, ""):
        return 12
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise WebError(400, f"limit must be a whole number, got {value!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise WebError(400, f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def _filter(value: Any) -> Optional[Dict[str, Any]]:
    """The filter as the CLI's --filter takes it: JSON text (or an object already)."""
    if value in (None, "") or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise WebError(400, f"filter is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise WebError(400, f'filter must be a JSON object of field: condition, e.g. {{"width": {{"$gte": 64}}}}, '
                            f"got {type(value).__name__}")
    return value or None


def _ids(value: Any, name: str) -> List[str]:
    if value in (None, ""):
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and _ID.match(v) for v in value):
        raise WebError(400, f"{name} must be a list of result ids")
    return list(dict.fromkeys(value))


def _search(call, client: ClipseekClient, **kwargs) -> List[Dict[str, Any]]:
    try:
        hits = call(client.search, kwargs.pop("text", None), **kwargs)
    except ClipseekError as e:
        message = str(e)
        raise WebError(503 if message.startswith("cannot reach") else 400, message) from None
    return [_hit_json(h) for h in hits]


def _hit_json(hit) -> Dict[str, Any]:
    uri = hit.uri or ""
    base, t = split_moment(uri)
    path = local_path(base) if base else None
    name = os.path.basename(path) if path else urllib.parse.urlparse(base).path.rsplit("/", 1)[-1] or base[:40]
    quoted = urllib.parse.quote(hit.id, safe="")
    out = {"id": hit.id, "uri": uri, "name": name or hit.id, "score": round(float(hit.score), 6),
           "tags": hit.tags or {}, "width": hit.width, "height": hit.height, "taken": hit.taken,
           "thumb": f"/api/thumb/{quoted}", "t": t}
    if t is not None and path is not None:
        out["video"] = f"/api/video/{quoted}#t={format_time(t)}"
    return out


def _date(value: Any, name: str) -> Optional[str]:
    """A date of the page's range (an ISO date, as an <input type=date> sends it), or None."""
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not _DATE.match(value):
        raise WebError(400, f"{name} must be a date as YYYY-MM-DD, got {str(value)[:40]!r}")
    return value


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
                ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}


def _video_type(path: str) -> str:
    return _VIDEO_TYPES.get(os.path.splitext(path)[1].lower(), "application/octet-stream")


def _same_file(record, path: str, roots: Optional[List[str]]) -> str:
    """The real path of ``path`` if it is the regular file indexed for ``record`` (the same size and
    modification time) and lies under ``roots``; else WebError 404. A video is too big to hash per request."""
    try:
        real = check_allowed_root(record.uri, path, roots) if roots is not None else os.path.realpath(path)
        st = os.stat(real)
    except (ImageError, OSError) as e:
        logger.warning("video %s not served: %s", record.id, e)
        raise WebError(404, f"video {record.id} is not readable by this server") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size != record.size or record.mtime is None \
            or abs(st.st_mtime - record.mtime) > 1e-6:
        raise WebError(404, f"video {record.id}: the file at its path is not the video that was indexed "
                            f"(changed since); index it again to play it")
    return real


async def _read_body(request: Request, cap: int, too_large: WebError) -> bytes:
    """The request body, at most ``cap`` bytes; ``too_large`` past that, before the body is kept whole."""
    length = request.headers.get("content-length", "")
    body = bytearray()
    over = length.isdigit() and int(length) > cap
    drained = 0
    async for chunk in request.stream():
        if over:
            # read (and drop) what a browser is still sending, so it sees the 413 rather than a reset
            drained += len(chunk)
            if drained > 4 * cap:
                break
            continue
        body += chunk
        if len(body) > cap:
            over, body = True, bytearray()
    if over:
        raise too_large
    return bytes(body)


async def _read_upload(request: Request, max_bytes: int):
    """(file bytes, limit) of a multipart upload; 413 past ``max_bytes``, 400 for anything malformed.

    The body is read here with a cap, before any parsing: an oversized upload is never kept whole."""
    from starlette.requests import Request as StarletteRequest

    too_large = WebError(413, f"the upload is larger than {max_bytes / 2**20:g} MiB; pick a smaller picture")
    body = await _read_body(request, max_bytes + 64 * 1024, too_large)  # room for the multipart headers and fields

    async def replay():
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        form = await StarletteRequest(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as e:
        raise WebError(400, f"expected a multipart form with one file ({type(e).__name__})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise WebError(400, "no file in the upload (the form field is 'file')")
    data = await upload.read()
    if len(data) > max_bytes:
        raise too_large
    if not data:
        raise WebError(400, f"{upload.filename or 'the upload'} is empty (0 bytes)")
    return data, _limit(form.get("limit"))


def _check_image(data: bytes) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except UnidentifiedImageError:
        raise WebError(400, "the upload is not an image (use a JPEG, PNG, WebP, GIF, BMP or TIFF file)") from None
    except Image.DecompressionBombError:
        raise WebError(413, "the image has too many pixels") from None
    except Exception as e:
        raise WebError(400, f"the upload is not a readable image ({e})") from None


def _thumbnail(uri: str, path: str, doc_id: str, indexed_hash: Optional[str], roots: Optional[List[str]],
               t: Optional[float] = None) -> bytes:
    """A JPEG thumbnail of the file at ``path`` (for a moment of a video, ``t`` seconds in: that frame), read
    as the encoder reads it and served only if its content hash is the one stored for ``doc_id`` (the hash of
    the very bytes that were embedded)."""
    from executors.images.imaging import decode_image

    try:
        cap = THUMB_MAX_FILE_BYTES if t is None else MAX_VIDEO_BYTES
        data = read_local(uri, path, max_bytes=cap, allowed_roots=roots, cap_flag=None).data
    except ImageError as e:
        logger.warning("thumbnail of %s not served: %s", doc_id, e)
        raise WebError(404, f"picture {doc_id} is not readable by this server") from None
    if not indexed_hash or content_hash(data) != indexed_hash:
        logger.warning("thumbnail of %s not served: %s is not the picture that was indexed under that id", doc_id, uri)
        raise WebError(404, f"picture {doc_id}: the file at its path is not the picture that was indexed "
                            f"(changed since, or indexed from bytes it sent); index it again to preview it")
    try:
        img = decode_image(data, doc_id, draft_size=THUMB_SIZE, max_megapixels=100) if t is None else \
            frame_at(data, t, doc_id, short_side=THUMB_SIZE)
    except ImageError:
        raise WebError(404, f"picture {doc_id} cannot be decoded") from None
    img.thumbnail((THUMB_SIZE, THUMB_SIZE))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


# ---- serving ---------------------------------------------------------------------------------
class WebServer:
    """uvicorn running ``app`` in a daemon thread; ``stop()`` ends it."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        self.host, self.port = host, port
        # the page answers requests for the address it is served on (create_app's host and port, if unset)
        known_host, known_port = getattr(app.state, "clipseek_address", (None, None))
        app.state.clipseek_address = (host if known_host is None else known_host, port if known_port is None else known_port)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", loop="asyncio",
                                lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="clipseek-web", daemon=True)

    @property
    def url(self) -> str:
        host = client_host(self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 15.0) -> "WebServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ClipseekError(f"the web page could not listen on {self.host}:{self.port} "
                                    f"(is the port taken? use --web-port)")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)

    def __enter__(self) -> "WebServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(app: FastAPI, host: str, port: int) -> WebServer:
    """Start ``app`` on ``host:port`` in a background thread; returns once it listens."""
    return WebServer(app, host, port).start()


CSP = "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; base-uri 'none'"

PAGE = (files(__name__) / "index.html").read_text(encoding="utf-8")

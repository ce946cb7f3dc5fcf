"""A small web page for searching the index, served next to the flows by ``clipseek serve --web``.

Every request goes through one :class:`flows.client.ClipseekClient`: the page has no other way
to the flows or to the disk. Thumbnails are read only from the uri stored for an indexed id.

    from flows.client import ClipseekClient
    from flows.web import create_app, serve_in_thread
    server = serve_in_thread(create_app(ClipseekClient()), "127.0.0.1", 51002)
    print(server.url); ...; server.stop()
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from executors.imaging import local_path
from flows.client import ClipseekClient, ClipseekError
from flows.settings import client_host

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 2**20
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


def create_app(client: ClipseekClient, *, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The page (``GET /``) and the JSON API it uses, all answered through ``client``."""
    app = FastAPI(title="clipseek", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # one request at a time through the client's gRPC connections

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
        try:
            body = json.loads(await request.body() or b"{}")
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
        if not text and not like:
            raise WebError(400, "type something to search for, pick a result, or upload an image")
        started = time.perf_counter()
        hits = await run_in_threadpool(_search, call, client, text=text, limit=limit, filter=where,
                                       like=like, unlike=unlike)
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
        uri = found[0].uri
        if uri.startswith(("http://", "https://")):
            return RedirectResponse(uri, status_code=307)
        path = local_path(uri)
        if path is None:  # data: URIs are not kept whole
            raise WebError(404, f"picture {doc_id} has no file to show")
        return Response(_thumbnail(path, doc_id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    return app


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
    path = local_path(uri) if uri else None
    name = os.path.basename(path) if path else urllib.parse.urlparse(uri).path.rsplit("/", 1)[-1] or uri[:40]
    return {"id": hit.id, "uri": uri, "name": name or hit.id, "score": round(float(hit.score), 6),
            "tags": hit.tags or {}, "width": hit.width, "height": hit.height,
            "thumb": f"/api/thumb/{urllib.parse.quote(hit.id, safe='')}"}


async def _read_upload(request: Request, max_bytes: int):
    """(file bytes, limit) of a multipart upload; 413 past ``max_bytes``, 400 for anything malformed.

    The body is read here with a cap, before any parsing: an oversized upload is never kept whole."""
    from starlette.requests import Request as StarletteRequest

    too_large = WebError(413, f"the upload is larger than {max_bytes / 2**20:g} MiB; pick a smaller picture")
    cap = max_bytes + 64 * 1024  # room for the multipart headers and the other fields
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


def _thumbnail(path: str, doc_id: str) -> bytes:
    from executors.imaging import ImageError, decode_image

    try:
        if os.path.getsize(path) > THUMB_MAX_FILE_BYTES:
            raise WebError(404, f"picture {doc_id} is too large to preview")
        with open(path, "rb") as f:
            data = f.read()
        img = decode_image(data, doc_id, draft_size=THUMB_SIZE, max_megapixels=100)
    except OSError:
        raise WebError(404, f"picture {doc_id} is no longer readable on the server") from None
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


CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; base-uri 'none'"

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clipseek</title>
<style>
  :root { --fg: #1d1f23; --muted: #6b7079; --line: #dde0e5; --accent: #2856d8; --bad: #b3261e; --good: #1b7f3b; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: #f6f7f9; }
  header { background: #fff; border-bottom: 1px solid var(--line); padding: 14px 20px; position: sticky; top: 0; z-index: 1; }
  h1 { font-size: 18px; margin: 0 0 10px; }
  form { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
  input[type=text] { flex: 1 1 320px; padding: 8px 10px; border: 1px solid var(--line); border-radius: 6px; font: inherit; }
  #filter { flex: 1 1 220px; font-family: ui-monospace, monospace; font-size: 13px; }
  input[type=number] { width: 70px; padding: 8px; border: 1px solid var(--line); border-radius: 6px; font: inherit; }
  button, .upload { padding: 8px 14px; border: 1px solid var(--accent); background: var(--accent); color: #fff; border-radius: 6px; font: inherit; cursor: pointer; }
  .upload { background: #fff; color: var(--accent); }
  .upload input { display: none; }
  #bar { margin-top: 8px; font-size: 13px; color: var(--muted); min-height: 18px; }
  #error { color: var(--bad); font-weight: 600; }
  #error:empty { display: none; }
  main { padding: 16px 20px; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 14px; }
  .hit { background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; display: flex; flex-direction: column; }
  .hit.liked { outline: 2px solid var(--good); }
  .hit img { width: 100%; aspect-ratio: 1; object-fit: cover; background: #eceef1; cursor: zoom-in; display: block; }
  .meta { padding: 6px 8px; font-size: 12px; }
  .name { word-break: break-all; }
  .score { color: var(--muted); }
  .move { font-weight: 600; margin-left: 4px; }
  .move.up { color: var(--good); } .move.down { color: var(--bad); } .move.new { color: var(--accent); }
  .actions { display: flex; gap: 6px; padding: 0 8px 8px; }
  .actions button { flex: 1; padding: 4px; font-size: 12px; background: #fff; color: var(--fg); border-color: var(--line); }
  .actions button.on { background: var(--good); color: #fff; border-color: var(--good); }
  .actions button.unlike.on { background: var(--bad); border-color: var(--bad); }
</style>
</head>
<body>
<header>
  <h1>clipseek</h1>
  <form id="form" autocomplete="off">
    <input type="text" id="q" name="q" placeholder="describe a picture, e.g. a large red circle on a white background">
    <input type="number" id="limit" min="1" max="100" value="12" title="number of results">
    <input type="text" id="filter" placeholder='filter, e.g. {"width": {"$gte": 64}}' title="JSON filter, as clipseek search --filter">
    <button type="submit" id="go">Search</button>
    <label class="upload" title="search by example">Search by image<input type="file" id="file" accept="image/*"></label>
  </form>
  <div id="bar"><span id="error" role="alert"></span> <span id="info"></span></div>
</header>
<main><div id="results" data-round="0" aria-live="polite"></div></main>
<script>
"use strict";
const MAX_UPLOAD = __MAX_UPLOAD_BYTES__;
const $ = (id) => document.getElementById(id);
const state = { text: "", like: [], unlike: [], ranks: null, round: 0 };

function showError(message) { $("error").textContent = message || ""; }
function showInfo(message) { $("info").textContent = message || ""; }

async function api(url, options) {
  let response;
  try { response = await fetch(url, options); }
  catch (e) { throw new Error("the server did not answer (" + e.message + ")"); }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const why = body && (body.error || body.detail);
    throw new Error(typeof why === "string" ? why : ("request failed with status " + response.status));
  }
  return body;
}

function query() {
  return { text: state.text || null, limit: $("limit").value, filter: $("filter").value,
           like: state.like, unlike: state.unlike };
}

async function run(label, compare) {
  showError(""); showInfo("searching…");
  try {
    const body = await api("/api/search", { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify(query()) });
    render(body.hits, compare, label + " · " + body.hits.length + " results in " + body.seconds + " s");
  } catch (e) { showInfo(""); showError(e.message); }
}

function newSearch() {
  state.text = $("q").value.trim(); state.like = []; state.unlike = [];
  if (!state.text) { showError("type something to search for, pick a result, or upload an image"); return; }
  run("search “" + state.text + "”", false);
}

function moreLikeThis(id) {
  state.text = ""; state.like = [id]; state.unlike = [];
  run("more like this", false);
}

function feedback(id, kind) {
  const mine = kind === "like" ? state.like : state.unlike, other = kind === "like" ? state.unlike : state.like;
  const at = mine.indexOf(id);
  if (at >= 0) mine.splice(at, 1); else mine.push(id);
  const o = other.indexOf(id); if (o >= 0) other.splice(o, 1);
  if (!state.text && !state.like.length) { showError("like at least one result, or type a query"); return; }
  run("feedback round (" + state.like.length + " liked, " + state.unlike.length + " not liked)", true);
}

function render(hits, compare, label) {
  const before = compare ? state.ranks : null;
  const grid = $("results");
  grid.textContent = "";
  let moved = 0, fresh = 0;
  hits.forEach((hit, i) => {
    const rank = i + 1;
    const card = document.createElement("div");
    card.className = "hit" + (state.like.includes(hit.id) ? " liked" : "");
    card.dataset.id = hit.id; card.dataset.rank = rank; card.dataset.name = hit.name;
    const img = document.createElement("img");
    img.src = hit.thumb; img.alt = hit.name; img.loading = "eager"; img.title = "more like this";
    img.addEventListener("click", () => moreLikeThis(hit.id));
    const meta = document.createElement("div"); meta.className = "meta";
    const name = document.createElement("div"); name.className = "name"; name.textContent = "#" + rank + " " + hit.name;
    name.title = hit.uri;
    const score = document.createElement("span"); score.className = "score"; score.textContent = "score " + hit.score.toFixed(4);
    meta.append(name, score);
    if (before) {
      const move = document.createElement("span"); move.className = "move";
      const was = before[hit.id];
      if (was === undefined) { move.classList.add("new"); move.textContent = "new"; fresh++; }
      else if (was > rank) { move.classList.add("up"); move.textContent = "▲" + (was - rank) + " (was #" + was + ")"; moved++; }
      else if (was < rank) { move.classList.add("down"); move.textContent = "▼" + (rank - was) + " (was #" + was + ")"; moved++; }
      else { move.textContent = "="; }
      meta.append(move);
    }
    const actions = document.createElement("div"); actions.className = "actions";
    for (const kind of ["like", "unlike"]) {
      const b = document.createElement("button"); b.type = "button"; b.className = kind;
      b.textContent = kind === "like" ? "+ like" : "− unlike";
      if ((kind === "like" ? state.like : state.unlike).includes(hit.id)) b.classList.add("on");
      b.addEventListener("click", () => feedback(hit.id, kind));
      actions.append(b);
    }
    card.append(img, meta, actions);
    grid.append(card);
  });
  state.ranks = Object.fromEntries(hits.map((h, i) => [h.id, i + 1]));
  state.round += 1; grid.dataset.round = state.round;
  showInfo(label + (before ? " · " + moved + " moved, " + fresh + " new" : "") + (hits.length ? "" : " · no matches"));
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); newSearch(); });
$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  $("file").value = "";
  if (!file) return;
  showError("");
  if (file.size > MAX_UPLOAD) {
    showError(file.name + " is larger than " + (MAX_UPLOAD / 1048576) + " MiB; pick a smaller picture"); return;
  }
  const form = new FormData(); form.append("file", file); form.append("limit", $("limit").value);
  showInfo("searching by " + file.name + "…");
  try {
    const body = await api("/api/search-image", { method: "POST", body: form });
    state.text = ""; state.like = []; state.unlike = [];
    render(body.hits, false, "by example " + file.name + " · " + body.hits.length + " results in " + body.seconds + " s");
  } catch (e) { showInfo(""); showError(e.message); }
});
</script>
</body>
</html>
"""

"""The ``clipseek`` command: serve the flows, index pictures, search them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from typing import List, Optional, Tuple

from flows.settings import DEFAULT_HOST, DEFAULT_REQUEST_SIZE, Settings


def _add_connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--host", help="host of the flows (env CLIPSEEK_HOST, default 127.0.0.1)")
    g.add_argument("--index-port", type=int, help="port of the index flow (env CLIPSEEK_INDEX_PORT, default 51000)")
    g.add_argument("--search-port", type=int, help="port of the search flow (env CLIPSEEK_SEARCH_PORT, default 51001)")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub name or local folder of a CLIP model (env CLIPSEEK_MODEL, "
                                   "default openai/clip-vit-base-patch32)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (env CLIPSEEK_DEVICE, default cuda if available)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "int8", "float16"],
                   help="model precision (env CLIPSEEK_DTYPE, default auto: float16 on cuda; on cpu bfloat16 where the "
                        "CPU has native bfloat16, else int8 where faster, else float32)")
    g.add_argument("--batch-size", type=int, help="images per model call (env CLIPSEEK_BATCH_SIZE, default 32)")
    g.add_argument("--workspace", help="folder of the index files (env CLIPSEEK_WORKSPACE, default ./workspace of the project)")
    g.add_argument("--max-megapixels", type=float, help="decode bigger JPEGs at a reduced scale, refuse other bigger "
                                                         "images (env CLIPSEEK_MAX_MEGAPIXELS, default 100)")
    g.add_argument("--shards", type=int, help="indexer shards in both flows (env CLIPSEEK_SHARDS, default 1 as in the YAML)")


def _threshold(text: str) -> float:
    """A near-duplicate threshold: a cosine from 0.5 to 1 (lower links nearly every pair of pictures)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.5 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0.5 to 1 (a cosine), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipseek", description="Text-to-image search over your pictures with CLIP.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the flows' own logs (jina, transformers) instead of writing them to the workspace's clipseek.log")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add_parser(*a, parents=[common], **kw)  # -v after the command too

    p = sub.add_parser("serve", help="start the index and search flows over gRPC (Ctrl-C stops them)",
                       description="Start the index flow and the search flow over gRPC and keep them running until "
                                   "Ctrl-C or SIGTERM. Their own logs go to clipseek.log in the workspace (-v shows "
                                   "them here). One server per workspace.")
    _add_connection(p)
    _add_model(p)
    p.add_argument("--allow-private-urls", action="store_true", default=None,
                   help="let the server fetch URLs on loopback, private and link-local addresses "
                        "(env CLIPSEEK_ALLOW_PRIVATE_URLS=1; off by default against request forgery)")
    p.add_argument("--url-timeout", type=float, metavar="SECONDS",
                   help="seconds the server waits for one URL it fetches (env CLIPSEEK_URL_TIMEOUT, default 10)")
    p.add_argument("--max-download-bytes", type=int, metavar="BYTES",
                   help="most bytes the server reads from one URL or file (env CLIPSEEK_MAX_DOWNLOAD_BYTES, "
                        "default 52428800 = 50 MiB)")
    p.add_argument("--bind", metavar="HOST", help="listen on this host instead of 127.0.0.1 (e.g. 0.0.0.0 for every "
                                                  "interface; anyone who can reach it can index and search)")
    p.add_argument("--allow-root", dest="allowed_roots", action="append", metavar="DIR",
                   help="read local paths sent by clients only under this folder (repeatable; env "
                        "CLIPSEEK_ALLOWED_ROOTS, os.pathsep-separated; default: anywhere)")
    p.add_argument("--web", action="store_true", help="also serve a search page on http://HOST:WEB_PORT/ "
                                                       "(HOST as the flows: 127.0.0.1 unless --bind)")
    p.add_argument("--web-port", type=int, help="port of the --web page (env CLIPSEEK_WEB_PORT, default 51002)")

    p = sub.add_parser("index", help="index images and videos: folders (recursive), globs, files, URLs",
                       description="Embed pictures (and moments of videos) and store them in the index of a running "
                                   "`clipseek serve`: folders are walked recursively, globs expanded, URLs fetched by "
                                   "the server. Files unchanged since the last run are skipped. The exit code is 1 if "
                                   "any file failed.")
    p.add_argument("sources", nargs="+", help="folder, glob, image or video file, or http(s)/file/data URL")
    p.add_argument("--video-spacing", type=float, metavar="SECONDS",
                   help="keep a moment of each video at least this often, besides one per scene change (default 5)")
    p.add_argument("--max-moments", type=int, metavar="N",
                   help="at most N moments per video, sampled evenly over a longer one (default and most: the "
                        "server's, 120)")
    p.add_argument("--request-size", dest="request_size", type=int, default=DEFAULT_REQUEST_SIZE,
                   help=f"images per request (default {DEFAULT_REQUEST_SIZE}: several model batches, so decoding "
                        f"overlaps the model for most of each request)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", type=_tag_pair,
                   help="tag stored with every image (also added to images already indexed and unchanged)")
    p.add_argument("--force", action="store_true", help="re-index files even when unchanged")
    p.add_argument("--prune", action="store_true", help="remove indexed files under the given folders that are gone")
    p.add_argument("--watch", action="store_true", help="keep indexing new and changed files until Ctrl-C")
    _add_connection(p)

    p = sub.add_parser("search", help="find the images that best match a text",
                       description="Find the indexed pictures that best match a text, an example image or both, "
                                   "moved towards (--plus) or away from (--minus) other texts or images, and refined "
                                   "with the ids of results you liked or not. Prints rank, score (cosine, -1 to 1), "
                                   "path and [id].")
    p.add_argument("text", nargs="?", help="what to look for, e.g. 'a black cat' (optional with --image or --like)")
    p.add_argument("--image", help="search by example: an image file or URL (with a text, both count)")
    p.add_argument("--plus", action="append", default=[], metavar="TEXT|IMAGE", help="move towards this text or image")
    p.add_argument("--minus", action="append", default=[], metavar="TEXT|IMAGE", help="move away from this text or image")
    p.add_argument("--like", action="append", default=[], metavar="ID", help="id of a result you liked (feedback round)")
    p.add_argument("--unlike", action="append", default=[], metavar="ID", help="id of a result you did not like")
    p.add_argument("--weight", action="append", default=[], metavar="NAME=VALUE",
                   help="query_weight, plus_weight, minus_weight, like_weight, unlike_weight (defaults 1, 1, 0.5, 0.75, 0.25)")
    p.add_argument("-k", "--limit", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--min-score", type=float, help="drop results scoring below this cosine")
    p.add_argument("--filter", help='JSON metadata filter, e.g. \'{"label": "cat", "width": {"$gte": 640}}\'')
    p.add_argument("--after", metavar="DATE", help="only pictures taken at or after DATE (ISO: 2019-06-01 or "
                                                    "2019-06-01T18:00; EXIF date, else the file's time)")
    p.add_argument("--before", metavar="DATE", help="only pictures taken before DATE (ISO; 2019-09-01 ends with "
                                                     "August 31)")
    p.add_argument("--sort", choices=["score", "date"], default="score",
                   help="order of the results kept: by score (default), or newest first (the best --limit by "
                        "score are kept either way)")
    p.add_argument("--all-moments", action="store_true",
                   help="list every matching moment of a video (default: a video's best moment only)")
    p.add_argument("--plot", metavar="PNG", help="save a grid of the hits with their scores")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    _add_connection(p)

    p = sub.add_parser("demo", help="offline walkthrough: generate pictures, serve, index, search, plot",
                       description="Offline walkthrough: generate a world of pictures, start both flows with the "
                                   "small CLIP shipped in data/models/clipseek-demo, index the pictures, run a few "
                                   "queries, print the hits and save a grid of them.")
    p.add_argument("--model", help="CLIP model (default: the shipped data/models/clipseek-demo)")
    p.add_argument("--images", help="index this folder instead of generated pictures")
    p.add_argument("--query", action="append", help="query to run (repeatable; default: five demo queries)")
    p.add_argument("-k", "--limit", type=int, default=5, help="results per query (default 5)")
    p.add_argument("-n", "--count", type=int, default=240, help="pictures to generate (default 240)")
    p.add_argument("--plot", default="demo-hits.png", help="where to save the grid of hits (default demo-hits.png)")
    p.add_argument("--device", help="cpu, cuda ... (default cuda if available)")
    p.add_argument("--workspace", help="folder for the demo's pictures and index (default workspace/demo)")

    p = sub.add_parser("train-demo-model", help="train the small demo CLIP on the generated picture world (CPU)",
                       description="Train the small demo CLIP on the generated picture world, on the CPU, within a "
                                   "time budget; evaluate it on held-out pictures and save it, with training.json, "
                                   "to --out.")
    from clipseek.demo.train import add_arguments as add_training_arguments

    add_training_arguments(p)

    p = sub.add_parser("snapshot", help="write the index to one portable file, or restore it from one",
                       description="create: write the index of a workspace to one portable, checksummed file. "
                                   "restore: replace the index with the one in such a file, verified whole before "
                                   "anything is replaced (stop the servers of that workspace first).")
    p.add_argument("action", choices=["create", "restore"],
                   help="create: write the index to FILE; restore: replace the index with the one in FILE")
    p.add_argument("file", help="snapshot file (.zip)")
    p.add_argument("--force", action="store_true", help="create: replace the file if it exists")
    p.add_argument("--workspace", help="workspace of the index (env CLIPSEEK_WORKSPACE, default ./workspace of the project)")
    p.add_argument("--shard", type=int, default=0, help="shard of the index (default 0)")

    p = sub.add_parser("export", help="write Kubernetes or docker compose manifests of both flows",
                       description="Write Kubernetes manifests or docker compose files for both flows, with one "
                                   "image per executor (build them from the Dockerfile).")
    p.add_argument("kind", choices=["kubernetes", "docker-compose"],
                   help="kubernetes manifests (one namespace per flow) or docker compose files")
    p.add_argument("out", help="output folder")
    p.add_argument("--image-prefix", default="clipseek", help="registry/prefix of the executor images (default clipseek)")
    p.add_argument("--tag", default="0.1.0", help="image tag (default 0.1.0)")
    p.add_argument("--shards", type=int, help="indexer shards (default: as in the flow YAMLs)")
    p.add_argument("--model", help="CLIP model the encoders load: a hub name or a folder inside the image "
                                   "(/app/data/models/clipseek-demo is baked in), or with --model-volume the folder "
                                   "inside that volume")
    p.add_argument("--model-volume", metavar="VOLUME",
                   help="where the encoders read the model from, mounted read-only at /models in every encoder of "
                        "both flows: an existing PersistentVolumeClaim of this name in each flow's namespace "
                        "(kubernetes), or a named volume or host folder (docker-compose)")

    p = sub.add_parser("classify", help="zero-shot labels for an image, with probabilities",
                       description="Zero-shot classification on the search flow: score one image against each "
                                   "label and print the labels with their probabilities, most likely first.")
    p.add_argument("image", help="image file or URL")
    p.add_argument("--labels", help="comma-separated labels, e.g. 'cat,dog,car'")
    p.add_argument("--labels-file", help="file with one label per line")
    p.add_argument("--template", help="prompt template with {} for the label (default 'a photo of a {}')")
    p.add_argument("--json", action="store_true", help="print the labels and probabilities as JSON")
    _add_connection(p)

    p = sub.add_parser("duplicates", help="list groups of near-identical images in the index",
                       description="List groups of near-identical pictures in the index (the same photo resized, "
                                   "recompressed or lightly cropped): every stored vector is compared with every "
                                   "other, and pairs at or above --threshold are linked into groups.")
    p.add_argument("--threshold", type=_threshold, default=0.95,
                   help="cosine at or above which two images are one, from 0.5 to 1 (default 0.95)")
    p.add_argument("--json", action="store_true", help="print the groups as JSON (id, uri, score of each picture)")
    _add_connection(p)

    p = sub.add_parser("status", help="count, dimension, model and size of the index",
                       description="Show how many pictures the index holds, their dimension, the model that made "
                                   "them and the bytes the index takes on disk.")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    _add_connection(p)

    p = sub.add_parser("delete", help="remove images from the index by id or by path/URL",
                       description="Remove pictures from the index, by id or by the path or URL they were indexed "
                                   "from. Prints how many were removed.")
    p.add_argument("keys", nargs="+", help="document id, or the path/URL it was indexed from")
    _add_connection(p)

    p = sub.add_parser("clear", help="remove everything from the index",
                       description="Remove every picture from the index (asks first, unless --yes).")
    p.add_argument("--yes", action="store_true", help="do not ask")
    _add_connection(p)
    return parser


def _settings(args) -> Settings:
    """Settings from every field that has a flag of the same name, over the environment and the defaults
    (a field added to Settings with a flag of its name needs nothing more here)."""
    s = Settings()
    for f in dataclasses.fields(Settings):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(s, f.name, value)
    if getattr(args, "bind", None):
        s.host = args.bind
    return s


def _client(args):
    from clipseek.client import ClipseekClient

    s = _settings(args)
    return ClipseekClient(s.index_address, s.search_address)


def cmd_serve(args) -> int:
    from flows.serving import check_ports, workspace_lock

    settings = _settings(args)
    if settings.host != DEFAULT_HOST and not args.bind:
        print(f"refusing to listen on {settings.host}: pass --bind {settings.host} to serve beyond this machine",
              file=sys.stderr)
        return 2
    web = bool(getattr(args, "web", False))
    # One server per workspace, refused before anything slow; every port checked before the flows are built.
    with workspace_lock(settings, web_port=settings.web_port if web else None):
        check_ports(settings, web=web)
        return _serve(args, settings)


def _serve(args, settings: Settings) -> int:
    from executors.models.loading import DEFAULT_MODEL, ModelLoadError, check_model_available
    from flows.serving import running_flows

    model = settings.model or DEFAULT_MODEL
    try:
        check_model_available(model)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log_file = _log_file(args, settings)
    print(f"clipseek: starting the index and search flows (model {model})"
          + (f"; their logs go to {log_file}" if log_file else ""), flush=True)
    with running_flows(settings, log_file=log_file):
        web = None
        if getattr(args, "web", False):
            from clipseek.client import ClipseekClient
            from clipseek.web import create_app, serve_in_thread

            app = create_app(ClipseekClient(settings.index_address, settings.search_address), allowed_roots=settings.allowed_roots)
            web = serve_in_thread(app, settings.host, settings.web_port)  # ClipseekError if the port is taken
        print(f"clipseek: ready. index flow grpc://{settings.host}:{settings.index_port}, "
              f"search flow grpc://{settings.host}:{settings.search_port}, "
              f"workspace {os.path.abspath(settings.workspace)}. Ctrl-C stops.", flush=True)
        if web is not None:
            print(f"clipseek: web page {web.url}", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        print("clipseek: stopping", flush=True)
        if web is not None:
            web.stop()
    return 0


def _log_file(args, settings: Settings) -> Optional[str]:
    """The workspace's log file for the flows' own output, or None with -v (shown on the console)."""
    if args.verbose:
        return None
    from flows.serving import log_path

    return log_path(settings)


def _iso(seconds: Optional[float]) -> Optional[str]:
    """Seconds since the epoch as an ISO datetime in UTC (the camera's own clock for an EXIF date)."""
    import datetime as dt

    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat()


EMPTY_INDEX = "the index is empty: add pictures with `clipseek index DIR` (folders, globs, files or URLs)"


def _tag_pair(text: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"wants KEY=VALUE, got {text!r}")
    return key, value


def _parse_tags(pairs: List[Tuple[str, str]]) -> dict:
    return dict(pairs)


def cmd_index(args) -> int:
    client = _client(args)
    tags = _parse_tags(args.tag)
    progress = _progress("indexing")
    parameters = {}
    if args.video_spacing is not None:
        parameters["video_spacing"] = args.video_spacing
    if args.max_moments is not None:
        parameters["max_moments"] = args.max_moments
    try:
        report = client.index(args.sources, batch_size=args.request_size, tags=tags, force=args.force,
                              progress=progress, parameters=parameters or None)
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted after {progress.done} of {progress.total or '?'} images: the ones indexed by then are "
              f"in the index, and the same command skips them next time", file=sys.stderr, flush=True)
        return 130
    _print_report(report)
    if args.prune:
        gone = client.prune([s for s in args.sources if os.path.isdir(os.path.expanduser(s))])
        print(f"pruned {len(gone)} (files gone)")
    if args.watch:
        import threading

        from clipseek.watch import watch

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        folders = [s for s in args.sources if os.path.isdir(os.path.expanduser(s))]
        print(f"watching {', '.join(folders)} (Ctrl-C stops)", flush=True)
        totals = {"indexed": 0, "deleted": 0}
        how = "stopped"
        try:
            watch(client, folders, stop=stop, tags=tags, batch_size=args.request_size,
                  on_changes=lambda batch: _print_watch_batch(batch, totals))
        except KeyboardInterrupt:
            how = "interrupted"
        print(f"{how}: while watching, indexed {totals['indexed']} and deleted {totals['deleted']}",
              file=sys.stderr, flush=True)
        return 0
    return 0 if not report.failed else 1


def _some(items, few: int = 3) -> str:
    """The first few items, then how many more: 'a, b, c and 9 more'."""
    items = list(items)
    shown = ", ".join(items[:few])
    return f"{shown} and {len(items) - few} more" if len(items) > few else shown


def _print_watch_batch(batch, totals: dict) -> None:
    """One batch of --watch: what was indexed, skipped, failed and deleted, each named."""
    report = batch.report
    totals["indexed"] += len(report.indexed)  # counted first: a Ctrl-C while printing still counts them
    totals["deleted"] += len(batch.deleted)
    if report.indexed:
        print(f"indexed {len(report.indexed)}: {_some(report.indexed)}", flush=True)
    if report.unchanged:
        print(f"unchanged {len(report.unchanged)} (skipped): {_some(report.unchanged)}", flush=True)
    for source, reason in report.failed:
        print(f"failed: {source}: {reason}", flush=True)
    if batch.deleted:
        print(f"deleted {len(batch.deleted)}: {_some(batch.deleted)}", flush=True)


def _print_report(report) -> None:
    tagged = f" ({len(report.tagged)} given the new tags)" if report.tagged else ""
    print(f"indexed {len(report.indexed)}, unchanged {len(report.unchanged)} (skipped{tagged}), "
          f"failed {len(report.failed)}", flush=True)
    for source, reason in report.failed:
        print(f"  failed: {source}: {reason}", flush=True)


def cmd_search(args) -> int:
    client = _client(args)
    where = None
    if args.filter:
        try:
            where = json.loads(args.filter)
        except json.JSONDecodeError as e:
            print(f"error: --filter is not valid JSON ({e})", file=sys.stderr)
            return 2
    weights = {}
    for pair in args.weight:
        name, sep, value = pair.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or name not in ("query_weight", "plus_weight", "minus_weight", "like_weight", "unlike_weight"):
            print(f"error: --weight wants NAME=NUMBER with a known name, got {pair!r}", file=sys.stderr)
            return 2
    if not (args.text or args.image or args.like):
        print("error: give a text, --image or --like", file=sys.stderr)
        return 2
    hits = client.search(args.text, limit=args.limit, min_score=args.min_score, filter=where, image=args.image,
                         plus=args.plus, minus=args.minus, like=args.like, unlike=args.unlike, weights=weights,
                         after=args.after, before=args.before, sort=args.sort, all_moments=args.all_moments)
    if args.json:
        print(json.dumps([{"rank": i + 1, "id": h.id, "score": round(h.score, 6), "uri": h.uri, "tags": h.tags,
                           "taken": _iso(h.taken), "taken_from": h.taken_from, "camera": h.camera,
                           "latitude": h.latitude, "longitude": h.longitude, "t": h.t}
                          for i, h in enumerate(hits)], indent=2))
    else:
        if not hits:
            print("no matches" if client.status().count else EMPTY_INDEX)
        for i, hit in enumerate(hits, 1):
            print(f"{i:>3}  {hit.score:+7.4f}  {hit.uri or hit.id}  [{hit.id}]")
    if args.plot:
        from clipseek.plotting import plot_hits

        plot_hits(args.text or args.image or "more like this", hits, args.plot)
        if not args.json:
            print(f"saved {args.plot}")
    return 0


def cmd_status(args) -> int:
    status = _client(args).status()
    info = {"count": status.count, "dim": status.dim, "model": status.model, "bytes_on_disk": status.bytes_on_disk,
            "schema_version": status.schema_version, "path": status.path}
    if args.json:
        print(json.dumps(info, indent=2))
    elif not status.count:
        print(f"{EMPTY_INDEX} ({status.path})")
    else:
        for key, value in info.items():
            print(f"{key:>15}: {value}")
    return 0


def cmd_delete(args) -> int:
    from executors.images.imaging import URL_PREFIXES, uri_id

    ids = []
    for key in args.keys:
        ids.append(key)
        if key.startswith(URL_PREFIXES):
            ids.append(uri_id(key))
        elif os.path.exists(os.path.expanduser(key)):
            ids.append(uri_id(os.path.abspath(os.path.expanduser(key))))
    removed = _client(args).delete(list(dict.fromkeys(ids)))
    print(f"deleted {removed}")
    return 0


def cmd_clear(args) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print("error: clear asks for confirmation; pass --yes", file=sys.stderr)
            return 2
        if input("remove everything from the index? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    status = _client(args).clear()
    print(f"cleared; {status.count} documents left")
    return 0


def _progress(desc: str):
    """A progress callback ``(n, total)`` that draws one tqdm bar, opened on the first call."""
    from tqdm import tqdm

    bars = []

    def update(n: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="img", desc=desc, disable=None))
        bars[0].update(n)
        update.done, update.total = update.done + n, total
        if bars[0].n >= total:
            bars[0].close()

    update.done, update.total = 0, 0  # how many of how many sources were handled so far
    update.close = lambda: bars and bars[0].close()
    return update


def cmd_demo(args) -> int:
    from executors.models.loading import ModelLoadError
    from clipseek.demo.run import DEMO_QUERIES, run_demo

    try:
        run_demo(model=args.model, images=args.images, queries=args.query or DEMO_QUERIES, limit=args.limit,
                 plot=args.plot, workspace=args.workspace, n=args.count, device=args.device,
                 progress=_progress("indexing"), quiet=not args.verbose)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_train_demo_model(args) -> int:
    from clipseek.demo.train import run

    run(args)
    return 0


def cmd_snapshot(args) -> int:
    """Works on the index files directly: restore needs the servers of this workspace stopped."""
    from executors.store import snapshot
    from executors.store.vector_store import VectorStore

    folder = os.path.join(_settings(args).workspace, "SimpleIndexer", str(args.shard))
    if args.action == "create":
        if not os.path.exists(os.path.join(folder, "meta.sqlite")):
            print(f"error: no index at {folder}", file=sys.stderr)
            return 2
        if os.path.exists(args.file) and not args.force:
            print(f"error: {args.file} exists; pass --force to replace it", file=sys.stderr)
            return 2
        store = VectorStore(folder)
        try:
            manifest = snapshot.create(store, args.file)
        finally:
            store.close()
        print(f"wrote {args.file}: {manifest['count']} documents, {manifest['dim']}-d, model {manifest['model']}")
    else:
        from flows.serving import workspace_lock

        settings = _settings(args)
        # a server of this workspace holds it, even one whose search flow never writes (no writer lock)
        with workspace_lock(settings, wait=2.0):
            manifest = snapshot.restore(args.file, folder)
        print(f"restored {manifest['count']} documents (model {manifest['model']}) into {folder}")
    return 0


def cmd_export(args) -> int:
    from flows.export import export

    for path in export(args.kind, args.out, prefix=args.image_prefix, tag=args.tag, shards=args.shards, model=args.model,
                       model_volume=args.model_volume):
        print(f"wrote {path}")
    return 0


def cmd_classify(args) -> int:
    labels = [label for label in (args.labels or "").split(",") if label.strip()]
    if args.labels_file:
        with open(args.labels_file, encoding="utf-8") as f:
            labels += [line.strip() for line in f if line.strip()]
    if not labels:
        print("error: give --labels or --labels-file", file=sys.stderr)
        return 2
    result = _client(args).classify(args.image, labels, template=args.template)
    if args.json:
        print(json.dumps([{"label": label, "probability": round(p, 6)} for label, p in result], indent=2))
    else:
        for label, p in result:
            print(f"{p:7.2%}  {label}")
    return 0


def cmd_duplicates(args) -> int:
    groups = _client(args).duplicates(args.threshold)
    if args.json:
        print(json.dumps([[{"id": h.id, "uri": h.uri, "score": round(h.score, 6)} for h in g] for g in groups], indent=2))
        return 0
    print(f"{len(groups)} groups of near-identical images (cosine >= {args.threshold})")
    for n, group in enumerate(groups, 1):
        print(f"group {n}:")
        for hit in group:
            print(f"  {hit.score:.4f}  {hit.uri or hit.id}")
    return 0


COMMANDS = {"demo": cmd_demo, "duplicates": cmd_duplicates, "classify": cmd_classify, "snapshot": cmd_snapshot, "export": cmd_export, "train-demo-model": cmd_train_demo_model, "serve": cmd_serve, "index": cmd_index, "search": cmd_search, "status": cmd_status,
            "delete": cmd_delete, "clear": cmd_clear}


# The commands that only talk to the servers: they never run a model. docarray imports torch (~2 s of a
# command's start) whenever it is installed, unless it finds torch missing.
CLIENT_COMMANDS = frozenset({"index", "search", "status", "delete", "clear", "classify", "duplicates"})


def console() -> int:
    """The ``clipseek`` command: ``main`` in a process of its own, where a command that only talks to the servers
    starts without torch (``clipseek search`` answers in about a second instead of three)."""
    args = sys.argv[1:]
    command = next((a for a in args if not a.startswith("-")), None)
    if command in CLIENT_COMMANDS and "torch" not in sys.modules:
        sys.modules["torch"] = None  # `import torch` raises ImportError here: docarray takes it as absent
    return main(args)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for noisy in ("jina", "transformers", "httpx", "huggingface_hub", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # gRPC's C core writes its notices past Python's logging, straight to the console (absl's "All log
        # messages before absl::InitializeLog()", "Got goaway"): errors only, unless -v
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        if args.command == "export":  # jina's exporter prints INFO lines with console markup
            os.environ.setdefault("JINA_LOG_LEVEL", "WARNING")
    from clipseek.client import ClipseekError

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): end quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not fail again
        return 0
    except (ClipseekError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug still ends in one line, with the way to the details
        if args.verbose:
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (run with -v for the details)", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    first, _, rest = text.partition("\n")
    hint = rest.strip().splitlines()
    return first if not hint else f"{first}\n  {hint[0] if len(hint) == 1 else ' '.join(hint)}"


if __name__ == "__main__":
    sys.exit(console())

"""The ``clipseek`` command: serve the flows, index pictures, search them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import List, Optional

from flows.settings import DEFAULT_HOST, Settings


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
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="model dtype (float16 on cuda only)")
    g.add_argument("--batch-size", type=int, help="images per model call (env CLIPSEEK_BATCH_SIZE, default 32)")
    g.add_argument("--workspace", help="folder of the index files (env CLIPSEEK_WORKSPACE, default ./workspace of the project)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipseek", description="Text-to-image search over your pictures with CLIP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the index and search flows over gRPC (Ctrl-C stops them)")
    _add_connection(p)
    _add_model(p)
    p.add_argument("--bind", metavar="HOST", help="listen on this host instead of 127.0.0.1 (e.g. 0.0.0.0 for every "
                                                  "interface; anyone who can reach it can index and search)")

    p = sub.add_parser("index", help="index images: folders (recursive), globs, files, URLs")
    p.add_argument("sources", nargs="+", help="folder, glob, image file, or http(s)/file/data URL")
    p.add_argument("--batch-size", type=int, default=32, help="documents per request (default 32)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="tag stored with every image")
    p.add_argument("--force", action="store_true", help="re-index files even when unchanged")
    _add_connection(p)

    p = sub.add_parser("search", help="find the images that best match a text")
    p.add_argument("text", help="what to look for, e.g. 'a black cat'")
    p.add_argument("-k", "--limit", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--min-score", type=float, help="drop results scoring below this cosine")
    p.add_argument("--filter", help='JSON metadata filter, e.g. \'{"label": "cat", "width": {"$gte": 640}}\'')
    p.add_argument("--plot", metavar="PNG", help="save a grid of the hits with their scores")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    _add_connection(p)

    p = sub.add_parser("status", help="count, dimension, model and size of the index")
    p.add_argument("--json", action="store_true")
    _add_connection(p)

    p = sub.add_parser("delete", help="remove images from the index by id or by path/URL")
    p.add_argument("keys", nargs="+", help="document id, or the path/URL it was indexed from")
    _add_connection(p)

    p = sub.add_parser("clear", help="remove everything from the index")
    p.add_argument("--yes", action="store_true", help="do not ask")
    _add_connection(p)
    return parser


def _settings(args) -> Settings:
    s = Settings()
    for name in ("host", "index_port", "search_port", "model", "device", "dtype", "batch_size", "workspace"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(s, name, value)
    if getattr(args, "bind", None):
        s.host = args.bind
    return s


def _client(args):
    from flows.client import ClipseekClient

    s = _settings(args)
    return ClipseekClient(s.index_address, s.search_address)


def cmd_serve(args) -> int:
    from executors.clip_model import DEFAULT_MODEL, ModelLoadError, check_model_available
    from flows.serving import running_flows

    settings = _settings(args)
    if settings.host != DEFAULT_HOST and not args.bind:
        print(f"refusing to listen on {settings.host}: pass --bind {settings.host} to serve beyond this machine",
              file=sys.stderr)
        return 2
    model = settings.model or DEFAULT_MODEL
    try:
        check_model_available(model)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with running_flows(settings):
        print(f"clipseek: index flow grpc://{settings.host}:{settings.index_port}, "
              f"search flow grpc://{settings.host}:{settings.search_port}, model {model}, "
              f"workspace {os.path.abspath(settings.workspace)}. Ctrl-C stops.", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        print("clipseek: stopping", flush=True)
    return 0


def _parse_tags(pairs: List[str]) -> dict:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --tag wants KEY=VALUE, got {pair!r}")
        tags[key] = value
    return tags


def cmd_index(args) -> int:
    from tqdm import tqdm

    from flows.client import expand_sources

    client = _client(args)
    tags = _parse_tags(args.tag)
    total = len(expand_sources(args.sources))
    with tqdm(total=total, unit="img", desc="indexing", disable=None) as bar:
        report = client.index(args.sources, batch_size=args.batch_size, tags=tags, force=args.force,
                              progress=bar.update)
    print(f"indexed {len(report.indexed)}, unchanged {len(report.unchanged)} (skipped), failed {len(report.failed)}")
    for source, reason in report.failed:
        print(f"  failed: {source}: {reason}")
    return 0 if not report.failed else 1


def cmd_search(args) -> int:
    client = _client(args)
    where = None
    if args.filter:
        try:
            where = json.loads(args.filter)
        except json.JSONDecodeError as e:
            print(f"error: --filter is not valid JSON ({e})", file=sys.stderr)
            return 2
    hits = client.search(args.text, limit=args.limit, min_score=args.min_score, filter=where)
    if args.json:
        print(json.dumps([{"rank": i + 1, "id": h.id, "score": round(h.score, 6), "uri": h.uri, "tags": h.tags}
                          for i, h in enumerate(hits)], indent=2))
    else:
        if not hits:
            print("no matches")
        for i, hit in enumerate(hits, 1):
            print(f"{i:>3}  {hit.score:.4f}  {hit.uri or hit.id}")
    if args.plot:
        from flows.plotting import plot_hits

        plot_hits(args.text, hits, args.plot)
        if not args.json:
            print(f"saved {args.plot}")
    return 0


def cmd_status(args) -> int:
    status = _client(args).status()
    info = {"count": status.count, "dim": status.dim, "model": status.model, "bytes_on_disk": status.bytes_on_disk,
            "schema_version": status.schema_version, "path": status.path}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>15}: {value}")
    return 0


def cmd_delete(args) -> int:
    from executors.imaging import uri_id

    ids = []
    for key in args.keys:
        ids.append(key)
        if key.startswith(("http://", "https://", "file://", "data:")):
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


COMMANDS = {"serve": cmd_serve, "index": cmd_index, "search": cmd_search, "status": cmd_status,
            "delete": cmd_delete, "clear": cmd_clear}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from flows.client import ClipseekError

    try:
        return COMMANDS[args.command](args)
    except (ClipseekError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`clipseek demo`: generate a picture world, serve the flows, index it, search it, plot the hits.

Works offline with the shipped model (data/models/clipseek-demo); ``--model`` and ``--images``
turn it into the same run on a real CLIP and real pictures.
"""

import os
from typing import Callable, List, Optional, Sequence, Tuple

from executors.models.loading import check_model_available, model_id
from flows.settings import DEMO_MODEL_DIR, Settings

DEMO_QUERIES = (
    "a large red circle on a white background",
    "two small blue squares on a black background",
    "three yellow stars",
    "a large green heart on a black background",
    "a small purple triangle on a gray background",
)
DEMO_SEED = 2024


def demo_images(folder: str, n: int) -> str:
    """The demo's generated pictures in ``folder`` (re-generated only when missing or of another size)."""
    from clipseek.demo import world

    marker = os.path.join(folder, "captions.jsonl")
    if not (os.path.exists(marker) and len(world.read_world(folder)) == n):
        world.write_world(folder, n=n, seed=DEMO_SEED)
    return folder


def run_demo(*, model: Optional[str] = None, images: Optional[str] = None, queries: Sequence[str] = DEMO_QUERIES,
             limit: int = 5, plot: Optional[str] = "demo-hits.png", workspace: Optional[str] = None, n: int = 240,
             device: Optional[str] = None, say: Callable[[str], None] = print,
             progress: Optional[Callable[[int, int], None]] = None,
             quiet: bool = True) -> List[Tuple[str, list]]:
    """Generate (or take) pictures, serve both flows, index, search, plot; ``say`` tells the story.
    ``quiet`` sends the flows' own logs to ``clipseek.log`` in the demo's workspace."""
    from clipseek.client import ClipseekClient
    from flows.serving import free_port, log_path, running_flows

    model = model or DEMO_MODEL_DIR
    check_model_available(model)
    base = workspace or os.path.join(Settings().workspace, "demo")
    if images is None:
        images = demo_images(os.path.join(base, "images"), n)
        say(f"demo pictures: {n} generated in {images}")
    else:
        say(f"pictures: {images}")
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=model,
                        device=device, workspace=os.path.join(base, "index", model_id(model)))
    results = []
    log_file = log_path(Settings(workspace=base)) if quiet else None
    say(f"starting the index and search flows (model {model})" + (f"; their logs go to {log_file}" if log_file else ""))
    with running_flows(settings, log_file=log_file):
        say(f"ready: index flow {settings.index_address}, search flow {settings.search_address}")
        client = ClipseekClient(settings.index_address, settings.search_address)
        report = client.index([images], progress=progress)
        say(f"indexed {len(report.indexed)}, unchanged {len(report.unchanged)} (skipped), failed {len(report.failed)}")
        for source, reason in report.failed:
            say(f"  failed: {source}: {reason}")
        for query in queries:
            hits = client.search(query, limit=limit)
            results.append((query, hits))
            say(f"\n“{query}”")
            for rank, hit in enumerate(hits, 1):
                say(f"  {rank:>2}  {hit.score:.4f}  {os.path.basename(hit.uri or hit.id)}")
    if plot:
        from clipseek.plotting import plot_results

        plot_results(results, plot)
        say(f"\nsaved {plot}")
    return results

"""A matplotlib grid of search hits with their scores."""

from __future__ import annotations

import logging
import textwrap
from typing import Optional, Sequence, Tuple

from executors.images.imaging import ImageError, decode_image, read_source
from executors.images.video import MAX_VIDEO_BYTES, frame_at, split_moment

logger = logging.getLogger(__name__)


def plot_hits(query: str, hits: Sequence, path: Optional[str] = None, *, columns: int = 5, thumb: int = 256):
    """Draw ``hits`` (objects with ``uri`` and ``score``) in a grid titled by ``query``; save to ``path`` if given.
    Returns the matplotlib figure."""
    return plot_results([(query, hits)], path, columns=min(columns, max(1, len(hits))), thumb=thumb, wrap=True)


def plot_results(results: Sequence[Tuple[str, Sequence]], path: Optional[str] = None, *, columns: int = 5,
                 thumb: int = 256, wrap: bool = False):
    """One row of hits per (query, hits) pair, each hit labelled with rank and score; or, with ``wrap``,
    the hits of a single query wrapped over rows of ``columns``. Saved to ``path`` if given; returns the figure."""
    import matplotlib

    if path:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cells = []  # (row, column, query, rank, hit)
    if wrap:
        query, hits = results[0]
        cells = [(i // columns, i % columns, query, i, h) for i, h in enumerate(hits)]
        rows = max(1, -(-len(hits) // columns))
    else:
        columns = max(1, max((len(h) for _, h in results), default=1))
        cells = [(r, i, q, i, h) for r, (q, hits) in enumerate(results) for i, h in enumerate(hits)]
        rows = max(1, len(results))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.7 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if wrap:
        fig.suptitle(f"“{results[0][0]}”" + ("" if results[0][1] else ": no matches"))
    else:
        for r, (query, hits) in enumerate(results):
            label = "\n".join(textwrap.wrap(f"“{query}”", 22))  # wrapped to stay within its row
            axes[r][0].text(-0.08, 0.5, label, transform=axes[r][0].transAxes, rotation=90,
                            ha="right", va="center", fontsize=8)
    for row, col, _query, rank, hit in cells:
        ax = axes[row][col]
        label = f"#{rank + 1}  {hit.score:.3f}"
        try:
            base, t = split_moment(hit.uri)
            if t is None:
                img = decode_image(read_source(hit.uri, allow_private=True).data, hit.uri)  # the user's own hits
            else:  # a moment of a video: its frame
                img = frame_at(read_source(base, allow_private=True, max_bytes=MAX_VIDEO_BYTES).data, t, hit.uri)
            img.thumbnail((thumb, thumb))
            ax.imshow(img)
        except (ImageError, TypeError) as e:
            logger.warning("cannot show %s: %s", hit.uri, e)
            label += "\n(unreadable)"
        name = (hit.uri or hit.id).rsplit("/", 1)[-1]
        ax.set_title(f"{label}\n{name[:28]}", fontsize=7)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig

"""A matplotlib grid of search hits with their scores."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from executors.imaging import ImageError, decode_image, read_source

logger = logging.getLogger(__name__)


def plot_hits(query: str, hits: Sequence, path: Optional[str] = None, *, columns: int = 5, thumb: int = 256):
    """Draw ``hits`` (objects with ``uri`` and ``score``) in a grid titled by ``query``; save to ``path`` if given.
    Returns the matplotlib figure."""
    import matplotlib

    if path:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = max(1, len(hits))
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows + 0.4), squeeze=False)
    fig.suptitle(f"“{query}”" if hits else f"“{query}”: no matches")
    for ax in axes.ravel():
        ax.axis("off")
    for i, (ax, hit) in enumerate(zip(axes.ravel(), hits)):
        label = f"#{i + 1}  {hit.score:.3f}"
        try:
            img = decode_image(read_source(hit.uri).data, hit.uri)
            img.thumbnail((thumb, thumb))
            ax.imshow(img)
        except (ImageError, TypeError) as e:
            logger.warning("cannot show %s: %s", hit.uri, e)
            label += "\n(unreadable)"
        name = (hit.uri or hit.id).rsplit("/", 1)[-1]
        ax.set_title(f"{label}\n{name[:28]}", fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig

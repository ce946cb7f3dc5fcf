"""Query by example, arithmetic, feedback and zero-shot labels with the shipped model on the
generated picture world, asserting on rankings."""

import os

import pytest

from clipseek.demo import world
from clipseek.client import ClipseekClient
from flows.serving import flows_in_subprocess, free_port
from flows.settings import DEMO_MODEL_DIR, Settings

pytestmark = [pytest.mark.skipif(not os.path.exists(os.path.join(DEMO_MODEL_DIR, "config.json")),
                                 reason="the demo model is not in data/models"),
              pytest.mark.cpu_kind]  # rankings from the precision auto takes on this CPU


@pytest.fixture(scope="module")
def world_served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    records = world.write_world(str(folder), n=160, seed=31)
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=DEMO_MODEL_DIR,
                        device="cpu", workspace=str(tmp_path_factory.mktemp("ws")))
    with flows_in_subprocess(settings):
        client = ClipseekClient(settings.index_address, settings.search_address)
        assert len(client.index([str(folder)]).indexed) == 160
        yield client, folder, {r["file"]: r for r in records}


def _colours(hits, by_file):
    return [by_file[os.path.basename(h.uri)]["colour"] for h in hits]


def _shared(a, b) -> int:
    """How many of colour, shape, size, count and background two pictures have in common."""
    return sum(a[k] == b[k] for k in ("colour", "shape", "size", "count", "background"))


def _likeness(hits, example, by_file) -> float:
    return sum(_shared(by_file[os.path.basename(h.uri)], example) for h in hits) / len(hits)


def test_query_by_example_finds_pictures_like_it(world_served):
    client, folder, by_file = world_served
    name, record = next((n, r) for n, r in sorted(by_file.items()) if r["colour"] == "blue")
    hits = client.search(image=str(folder / name), limit=5)
    assert os.path.basename(hits[0].uri) == name  # itself first
    # the next four share far more with it than the world's pictures do on average (about 1.5 of 5)
    average = sum(_shared(r, record) for n, r in by_file.items() if n != name) / (len(by_file) - 1)
    assert _likeness(hits[1:], record, by_file) >= average + 1.0, (_likeness(hits[1:], record, by_file), average)


def test_arithmetic_moves_the_colour(world_served):
    client, _, by_file = world_served
    red = _colours(client.search("a large red shape", limit=5), by_file)
    moved = _colours(client.search("a large red shape", minus=["red"], plus=["green"],
                                   weights={"minus_weight": 1.0}, limit=5), by_file)
    assert red.count("red") >= 4 and moved.count("green") >= 4, (red, moved)


def test_feedback_round_pulls_towards_liked_pictures(world_served):
    client, _, by_file = world_served
    first = client.search("a small shape on a black background", limit=10)
    liked = [h for h in first if by_file[os.path.basename(h.uri)]["colour"] == "yellow"][:1]
    if not liked:  # no yellow among the first ten: like any yellow picture
        liked = [next(h for h in client.search("a yellow shape", limit=5))]
    unliked = [h.id for h in first if by_file[os.path.basename(h.uri)]["colour"] != "yellow"][:3]
    second = client.search("a small shape on a black background", like=[liked[0].id], unlike=unliked,
                           weights={"like_weight": 1.5}, limit=10)
    assert not set(unliked) & {h.id for h in second}
    assert second[0].id == liked[0].id
    # what the query left open (colour and shape) now leans to the liked picture's
    example = by_file[os.path.basename(liked[0].uri)]

    def leaning(hits):
        return sum((r["colour"] == example["colour"]) + (r["shape"] == example["shape"])
                   for r in (by_file[os.path.basename(h.uri)] for h in hits))

    assert leaning(second) > leaning(first), (leaning(second), leaning(first))


def test_zero_shot_labels_name_the_colour(world_served):
    client, folder, by_file = world_served
    labels = list(world.COLOURS)
    right = 0
    samples = sorted(by_file.items())[:24]
    for name, record in samples:
        result = client.classify(str(folder / name), [f"{c} shape" for c in labels], template="a {}")
        right += result[0][0] == f"{record['colour']} shape"
    assert right >= 0.8 * len(samples), f"{right}/{len(samples)}"

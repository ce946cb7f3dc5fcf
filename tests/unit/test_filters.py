"""Metadata filters run against a real VectorStore (its SQLite), with rows that have a field, lack it, and hold
it as null: the ids each operator returns, and the errors for malformed filters."""

import datetime as dt

import numpy as np
import pytest

from executors.store.filters import FilterError, to_sql
from executors.store.vector_store import Record, VectorStore

MAY1 = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc).timestamp()
DAY = 86400
# a, b, c have every tag (c lacks "ok"); d has no tags and every column; e holds its tags as JSON null and
# has empty columns.
ROWS = [
    Record("a", uri="/p/a.jpg", tags={"label": "cat", "n": 1, "ok": True, "width": 5}, mtime=MAY1 - DAY, size=100,
           width=640, height=480),
    Record("b", uri="/p/b.jpg", tags={"label": "dog", "n": 2, "ok": False}, mtime=MAY1 + 3600, size=200, width=1024,
           height=768),
    Record("c", uri="/p/c.png", tags={"label": "cat", "n": 3}, mtime=MAY1 + 40 * DAY, size=300, width=320, height=240),
    Record("d", uri="/p/d.png", tags={}, mtime=MAY1 + DAY, size=400, width=4000, height=3000),
    Record("e", uri="/p/e.png", tags={"label": None, "n": None, "ok": None}),
]
ALL = {"a", "b", "c", "d", "e"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = VectorStore(str(tmp_path_factory.mktemp("filters") / "store"))
    vectors = np.random.default_rng(0).standard_normal((len(ROWS), 8)).astype(np.float32)
    store.upsert(vectors, ROWS)
    assert store.get(["e"])["e"].width is None and store.get(["d"])["d"].tags == {}
    yield store
    store.close()


def matching(store, where):
    """The ids the store returns for ``where``, out of every row (limit above the row count)."""
    [hits] = store.search(np.ones(8, np.float32), limit=100, where=where)
    return {record.id for record, _ in hits}


def test_no_filter_is_every_row(store):
    assert matching(store, None) == matching(store, {}) == ALL
    assert to_sql(None) == to_sql({}) == ("1", [])


@pytest.mark.parametrize(
    "where, ids",
    [
        # equality: a scalar, or $eq; a row that lacks the tag or holds null never equals a value
        ({"label": "cat"}, {"a", "c"}),
        ({"label": {"$eq": "dog"}}, {"b"}),
        ({"n": 2}, {"b"}),
        ({"n": "2"}, set()),  # types are compared as stored: the number 2 is not the string "2"
        ({"ok": True}, {"a"}),  # booleans compare as JSON true / false
        ({"ok": False}, {"b"}),
        # $ne: every row without that value, rows lacking the tag or holding null included (MongoDB's meaning)
        ({"label": {"$ne": "cat"}}, {"b", "d", "e"}),
        ({"n": {"$ne": 1}}, {"b", "c", "d", "e"}),
        ({"ok": {"$ne": True}}, {"b", "c", "d", "e"}),
        # null: no value (lacking or null); $ne null: has one
        ({"label": None}, {"d", "e"}),
        ({"label": {"$eq": None}}, {"d", "e"}),
        ({"label": {"$ne": None}}, {"a", "b", "c"}),
        ({"ok": None}, {"c", "d", "e"}),
        # ranges never match a missing value
        ({"n": {"$gt": 1}}, {"b", "c"}),
        ({"n": {"$gte": 2}}, {"b", "c"}),
        ({"n": {"$lt": 2}}, {"a"}),
        ({"n": {"$lte": 2}}, {"a", "b"}),
        ({"n": {"$gt": 1, "$lt": 3}}, {"b"}),
        # $in: never a missing value, unless null is listed
        ({"label": {"$in": ["cat", "dog"]}}, {"a", "b", "c"}),
        ({"n": {"$in": [1, 3]}}, {"a", "c"}),
        ({"label": {"$in": ["dog", None]}}, {"b", "d", "e"}),
        ({"label": {"$in": [None]}}, {"d", "e"}),
        # $nin: every row outside the list, rows lacking the tag or holding null included, unless null is listed
        ({"label": {"$nin": ["cat"]}}, {"b", "d", "e"}),
        ({"n": {"$nin": [1, 2]}}, {"c", "d", "e"}),
        ({"label": {"$nin": ["cat", None]}}, {"b"}),
        ({"label": {"$nin": [None]}}, {"a", "b", "c"}),
        ({"label": {"$nin": ["cat", "dog"]}}, {"d", "e"}),
        # the tags. prefix names a tag, also one that shadows a column
        ({"tags.label": "dog"}, {"b"}),
        ({"tags.width": 5}, {"a"}),
        ({"tags.width": {"$ne": 5}}, {"b", "c", "d", "e"}),
        ({"tags.width": None}, {"b", "c", "d", "e"}),
        ({"tags.missing": {"$ne": "x"}}, ALL),
        ({"tags.missing": {"$nin": ["x", "y"]}}, ALL),
        ({"tags.missing": {"$in": ["x"]}}, set()),
        ({"tags.missing": None}, ALL),
        # every key and operator must hold
        ({"label": "cat", "n": {"$gte": 2}}, {"c"}),
        ({"label": {"$ne": "cat"}, "n": {"$ne": 2}}, {"d", "e"}),
    ],
)
def test_operators_on_tags(store, where, ids):
    assert matching(store, where) == ids


@pytest.mark.parametrize(
    "where, ids",
    [
        ({"width": 640}, {"a"}),
        ({"uri": {"$eq": "/p/c.png"}}, {"c"}),
        ({"width": {"$ne": 640}}, {"b", "c", "d", "e"}),  # e's width is empty: it matches $ne
        ({"width": None}, {"e"}),
        ({"width": {"$ne": None}}, {"a", "b", "c", "d"}),
        ({"width": {"$gt": 640}}, {"b", "d"}),
        ({"width": {"$gte": 640, "$lt": 4000}}, {"a", "b"}),
        ({"height": {"$lte": 480}}, {"a", "c"}),
        ({"size": {"$lt": 300}}, {"a", "b"}),
        ({"size": {"$in": [100, 400]}}, {"a", "d"}),
        ({"size": {"$nin": [100, 300]}}, {"b", "d", "e"}),
        ({"size": {"$nin": [100, 300, None]}}, {"b", "d"}),
        ({"width": {"$gt": 400}, "label": "cat"}, {"a"}),
        ({"indexed_at": {"$gt": 0}}, ALL),
    ],
)
def test_operators_on_columns(store, where, ids):
    assert matching(store, where) == ids


@pytest.fixture
def far_from_utc(monkeypatch):
    """This process's local time zone 10 hours west of UTC, so that a naive date read as local time shows."""
    import time

    monkeypatch.setenv("TZ", "Etc/GMT+10")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_iso_dates_on_mtime(store, far_from_utc):
    assert matching(store, {"mtime": {"$gte": "2024-05-01", "$lt": "2024-06-01"}}) == {"b", "d"}
    assert matching(store, {"mtime": {"$lt": "2024-05-01"}}) == {"a"}
    assert matching(store, {"mtime": {"$ne": "2024-05-02"}}) == ALL - {"d"}  # d is May 2nd, 00:00 UTC
    # an explicit offset is honoured (01:00 UTC on May 1st); naive dates are UTC
    assert matching(store, {"mtime": {"$gt": "2024-05-01T02:00:00+02:00", "$lt": "2024-05-01T01:30:00"}}) == {"b"}
    # epoch seconds pass through unchanged
    assert matching(store, {"mtime": {"$gte": MAY1 + DAY, "$lt": MAY1 + 2 * DAY}}) == {"d"}
    assert matching(store, {"indexed_at": {"$lt": "2000-01-01"}}) == set()
    # a date-looking string on a tag is compared as a string
    assert to_sql({"day": "2024-05-01"})[1] == ["2024-05-01"]


def test_values_are_parameters_never_sql(store):
    assert matching(store, {"label": "x' OR 1=1 --"}) == set()
    assert matching(store, {"label": {"$nin": ["x') OR 1=1 --"]}, "n": 1}) == {"a"}
    cond, params = to_sql({"label": "x' OR 1=1 --"})
    assert "OR 1=1" not in cond and params == ["x' OR 1=1 --"]
    assert matching(store, None) == ALL  # the table is untouched


def test_a_bad_filter_is_refused_by_the_store(store):
    with pytest.raises(FilterError, match=r"'\$regex'"):
        matching(store, {"label": {"$regex": "c.*"}})


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"width": {"$regex": "x"}}, "$regex"),
        ({"width": {"$in": []}}, "$in"),
        ({"label": {"$nin": "cat"}}, "$nin"),
        ({"a;drop": 1}, "a;drop"),
        ({"tags.a b": 1}, "tags.a b"),
        ({"tags.": 1}, "tags."),
        ({"": 1}, "non-empty"),
        ({"mtime": {"$gte": "last tuesday"}}, "last tuesday"),
        ({"indexed_at": {"$lt": "2024-13-45"}}, "2024-13-45"),
        ({"width": {}}, "width"),
        ({"label": {"$eq": {"nested": 1}}}, "label"),
        ({"label": {"$in": [["x"]]}}, "label"),
    ],
)
def test_bad_filters_name_the_bad_part(spec, needle):
    with pytest.raises(FilterError) as e:
        to_sql(spec)
    assert needle in str(e.value)


@pytest.mark.parametrize("spec", [["width", 3], "width=3", 42])
def test_non_dict_filter(spec):
    with pytest.raises(FilterError, match="JSON object"):
        to_sql(spec)


def test_unknown_operator_lists_the_valid_ones():
    with pytest.raises(FilterError) as e:
        to_sql({"size": {"$between": [1, 2]}})
    msg = str(e.value)
    assert "'$between'" in msg and "'size'" in msg and "$gte" in msg and "$nin" in msg


def test_filter_error_is_value_error():
    assert issubclass(FilterError, ValueError)

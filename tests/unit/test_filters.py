"""filters.to_sql: filter dicts -> SQL condition + parameters, and the errors for malformed filters."""

import datetime as dt
import json
import sqlite3

import pytest

from executors.store.filters import FilterError, to_sql


def tag(name):
    return f"json_extract(tags, '$.\"{name}\"')"


@pytest.fixture
def db():
    """The rows table the store filters, with a few rows to run conditions against."""
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE rows (row INTEGER PRIMARY KEY, id TEXT, uri TEXT, tags TEXT, content_hash TEXT, "
                "mtime REAL, size INTEGER, width INTEGER, height INTEGER, indexed_at REAL)")
    may1 = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc).timestamp()
    rows = [
        (0, "a", "/p/a.jpg", {"label": "cat", "n": 1, "ok": True}, may1 - 86400, 100, 640, 480),
        (1, "b", "/p/b.jpg", {"label": "dog", "n": 2, "ok": False}, may1 + 3600, 200, 1024, 768),
        (2, "c", "/p/c.png", {"label": "cat", "n": 3}, may1 + 40 * 86400, 300, 320, 240),
        (3, "d", "/p/d.png", {}, may1 + 86400, 400, 4000, 3000),
    ]
    con.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, 0)",
                    [(r, i, u, json.dumps(t), m, s, w, h) for r, i, u, t, m, s, w, h in rows])
    yield con
    con.close()


def matching(db, spec):
    cond, params = to_sql(spec)
    return [i for (i,) in db.execute(f"SELECT id FROM rows WHERE {cond} ORDER BY row", params)]


def test_empty_filter_is_true():
    assert to_sql(None) == ("1", [])
    assert to_sql({}) == ("1", [])


def test_equality_on_columns_and_tags(db):
    assert to_sql({"width": 640}) == ("width = ?", [640])
    assert to_sql({"label": "cat"}) == (f"{tag('label')} = ?", ["cat"])
    assert to_sql({"uri": {"$eq": "/p/a.jpg"}}) == ("uri = ?", ["/p/a.jpg"])
    assert to_sql({"label": {"$ne": "cat"}}) == (f"{tag('label')} != ?", ["cat"])
    assert matching(db, {"label": "cat"}) == ["a", "c"]
    assert matching(db, {"width": 1024}) == ["b"]
    assert matching(db, {"ok": True}) == ["a"]  # booleans compare as JSON true -> 1
    assert to_sql({"ok": False}) == (f"{tag('ok')} = ?", [0])


def test_tags_prefix_reaches_tags_that_shadow_columns(db):
    assert to_sql({"tags.width": 5}) == (f"{tag('width')} = ?", [5])
    assert to_sql({"tags.label": "cat"}) == (f"{tag('label')} = ?", ["cat"])
    assert matching(db, {"tags.label": "dog"}) == ["b"]


def test_in_and_nin(db):
    assert to_sql({"label": {"$in": ["cat", "dog"]}}) == (f"{tag('label')} IN (?, ?)", ["cat", "dog"])
    assert to_sql({"size": {"$nin": [100, 300, 400]}}) == ("size NOT IN (?, ?, ?)", [100, 300, 400])
    assert matching(db, {"tags.n": {"$in": [1, 3]}}) == ["a", "c"]
    assert matching(db, {"size": {"$nin": [100, 300]}}) == ["b", "d"]


def test_ranges_all_must_hold(db):
    cond, params = to_sql({"width": {"$gte": 640, "$lt": 4000}, "height": {"$gt": 100, "$lte": 768}})
    assert cond == "width >= ? AND width < ? AND height > ? AND height <= ?"
    assert params == [640, 4000, 100, 768]
    assert matching(db, {"width": {"$gte": 640, "$lt": 4000}}) == ["a", "b"]
    assert matching(db, {"width": {"$gt": 400}, "label": "cat"}) == ["a"]


def test_iso_dates_on_mtime(db):
    may1 = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc).timestamp()
    june1 = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc).timestamp()
    assert to_sql({"mtime": {"$gte": "2024-05-01", "$lt": "2024-06-01"}}) == ("mtime >= ? AND mtime < ?", [may1, june1])
    # an explicit offset is honoured; naive dates are UTC
    assert to_sql({"mtime": {"$gt": "2024-05-01T02:00:00+02:00"}})[1] == [may1]
    assert to_sql({"indexed_at": {"$lt": "2024-05-01T00:00:00"}})[1] == [may1]
    # epoch seconds pass through unchanged
    assert to_sql({"mtime": {"$gte": 1.7e9}})[1] == [1.7e9]
    assert matching(db, {"mtime": {"$gte": "2024-05-01", "$lt": "2024-06-01"}}) == ["b", "d"]
    assert matching(db, {"mtime": {"$lt": "2024-05-01"}}) == ["a"]
    # a date-looking string on a tag is not converted
    assert to_sql({"day": "2024-05-01"})[1] == ["2024-05-01"]


def test_parameters_not_inlined():
    cond, params = to_sql({"label": "x' OR 1=1 --"})
    assert "OR 1=1" not in cond and params == ["x' OR 1=1 --"]


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


def test_null_matches_missing_values():
    from executors.store.filters import to_sql

    sql, params = to_sql({"label": None, "width": {"$ne": None}})
    assert "IS NULL" in sql and "IS NOT NULL" in sql and params == []

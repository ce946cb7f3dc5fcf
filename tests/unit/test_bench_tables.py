"""The benchmarks' results files (benchmarks/common.py ``Results``) and their splice into the docs
(benchmarks/update_docs.py): every table once, in place of whatever the markers held before."""

import importlib.util
import os
import re

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load("common")
update_docs = _load("update_docs")


def _results(tmp_path, name="demo_bench", rows=((1, 2.5), (2, 0.125)), argv=("benchmarks/demo_bench.py", "--n", "2")):
    out = common.Results(f"/somewhere/{name}.py", {"n": 2, "mode": "fast"}, argv=list(argv), folder=str(tmp_path),
                         echo=False, kind="")
    out.table("Caption of the table", ["n", "ms"], rows, note="A note under it.")
    out.note("A closing remark.")
    return out


@pytest.fixture
def plain_env(monkeypatch):
    """No CLIPSEEK_* or *_NUM_THREADS variables (the command line a run names would list them)."""
    for name in list(os.environ):
        if name.startswith("CLIPSEEK_") or name.endswith("_NUM_THREADS"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_results_file_has_one_header_line_and_the_printed_tables(tmp_path, capsys, plain_env):
    path = _results(tmp_path).write()
    assert path == str(tmp_path / "demo_bench.md")
    text = open(path, encoding="utf-8").read()
    header, *rest = text.split("\n\n")
    assert "\n" not in header
    assert re.match(r"Run \d{4}-\d\d-\d\d \d\d:\d\d-(\d{4}-\d\d-\d\d )?\d\d:\d\d UTC; CPU ", header), header
    assert re.search(r"; load average [\d.]+ at the start, [\d.]+ at the end; `", header), header
    assert "`python benchmarks/demo_bench.py --n 2`" in header and "(options: n=2, mode=fast)" in header
    assert "GiB RAM" in header and "CPUs" in header
    assert rest[0] == "Caption of the table"
    assert rest[1].splitlines() == ["| n | ms    |", "| - | ----- |", "| 1 | 2.5   |", "| 2 | 0.125 |"]
    assert rest[2:] == ["A note under it.", "A closing remark.\n"]
    assert capsys.readouterr().out == ""  # echo=False: nothing printed


def test_each_cpu_kind_keeps_its_own_results_file(tmp_path, monkeypatch):
    from executors.models import precision

    monkeypatch.setattr(precision, "avx2_only", lambda: True)
    assert common.kind_suffix() == ".avx2"
    out = common.Results("/somewhere/demo_bench.py", argv=["demo_bench.py"], folder=str(tmp_path), echo=False)
    assert out.write() == str(tmp_path / "demo_bench.avx2.md")
    monkeypatch.setattr(precision, "avx2_only", lambda: False)
    assert common.kind_suffix() == ""
    out = common.Results("/somewhere/demo_bench.py", argv=["demo_bench.py"], folder=str(tmp_path), echo=False)
    assert out.write() == str(tmp_path / "demo_bench.md")
    assert sorted(os.listdir(tmp_path)) == ["demo_bench.avx2.md", "demo_bench.md"]


def test_a_cpu_kind_results_file_is_quoted_by_its_name(tmp_path):
    results = tmp_path / "results"
    common.Results("/x/demo_bench.py", argv=["x.py"], folder=str(results), echo=False, kind=".avx2").write()
    doc = tmp_path / "README.md"
    doc.write_text("<!-- results:demo_bench.avx2 -->\n<!-- /results -->\n")
    assert update_docs.main(["--results", str(results), str(doc)]) == 0
    assert (results / "demo_bench.avx2.md").read_text().strip() in doc.read_text()


def test_results_file_is_replaced_whole(tmp_path):
    _results(tmp_path, rows=((1, 9.0),)).write()
    _results(tmp_path, rows=((3, 4.0),)).write()
    text = (tmp_path / "demo_bench.md").read_text()
    assert "| 3 | 4 " in text and "| 1 | 9 " not in text
    assert os.listdir(tmp_path) == ["demo_bench.md"]  # no temporary file left


def test_command_line_is_relative_to_the_project_and_names_the_thread_settings(plain_env):
    plain_env.setenv("CLIPSEEK_TORCH_THREADS", "1")
    line = common.command_line([os.path.join(common.ROOT, "benchmarks", "x.py"), "--a", "b c"])
    assert line == "CLIPSEEK_TORCH_THREADS=1 python benchmarks/x.py --a 'b c'"


DOC = """# Title

Text before.

<!-- results:alpha -->
old alpha table
| stale | row |
<!-- /results -->

Between.

<!-- results:beta -->
<!-- /results -->

After.
"""


def test_splice_replaces_the_old_content_with_each_results_file_once():
    results = {"alpha": "Run A\n\n| a |\n| - |\n| 1 |\n", "beta": "Run B\n\n| b |\n"}
    new = update_docs.splice(DOC, results)
    assert "old alpha table" not in new and "stale" not in new
    for name, content in results.items():
        assert new.count(content.strip()) == 1
    assert new.startswith("# Title\n\nText before.\n\n<!-- results:alpha -->\n\nRun A")
    assert new.endswith("| b |\n\n<!-- /results -->\n\nAfter.\n")
    assert update_docs.splice(new, results) == new  # a second splice changes nothing
    changed = update_docs.splice(new, {**results, "alpha": "Run A2\n"})
    assert "Run A2" in changed and "Run A\n" not in changed and changed.count("Run B") == 1


def test_splice_of_some_tables_quotes_the_header_and_each_picked_table_with_its_caption_and_notes(tmp_path):
    out = common.Results("x.py", argv=["x.py"], folder=str(tmp_path), echo=False)
    out.table("First caption", ["a"], [[1]])
    out.table("Second caption", ["b"], [[2]], note="Second note.")
    out.table("Third caption", ["c"], [[3]], note="Third note.")
    out.note("Closing remark.")
    content = out.markdown()
    doc = "<!-- results:x#3,1 -->\n<!-- /results -->\n"
    new = update_docs.splice(doc, {"x": content})
    body = new.split("-->\n", 1)[1].rsplit("<!--", 1)[0].strip()
    paragraphs = body.split("\n\n")
    assert paragraphs[0] == content.split("\n\n")[0]  # the run's header line
    assert paragraphs[1:] == ["Third caption", "| c |\n| - |\n| 3 |", "Third note.", "Closing remark.",
                              "First caption", "| a |\n| - |\n| 1 |"]
    assert "Second" not in new
    assert update_docs.quoted(new) == ["x"]
    with pytest.raises(update_docs.SpliceError, match="table 4 asked for; the file has 3"):
        update_docs.splice("<!-- results:x#4 -->\n<!-- /results -->\n", {"x": content})


@pytest.mark.parametrize("doc, message", [
    ("<!-- results:alpha -->\nx\n", "never closed"),
    ("x\n<!-- /results -->\n", "without an opening"),
    ("<!-- results:alpha -->\n<!-- results:beta -->\n<!-- /results -->\n", "opens inside"),
    ("<!-- results:alpha -->\n<!-- /results -->\n<!-- results:alpha -->\n<!-- /results -->\n", "second time"),
    ("<!-- results:gamma -->\n<!-- /results -->\n", "no results file"),
])
def test_splice_refuses_markers_that_would_drop_or_duplicate_a_table(doc, message):
    with pytest.raises(update_docs.SpliceError, match=message):
        update_docs.splice(doc, {"alpha": "A", "beta": "B"})


def test_a_results_file_no_doc_quotes_is_named_and_fails_the_check(tmp_path, capsys):
    doc = tmp_path / "README.md"
    doc.write_text("<!-- results:alpha -->\n<!-- /results -->\n")
    plan, unquoted = update_docs.update([str(doc)], {"alpha": "A", "beta": "B"})
    assert unquoted == ["beta"] and plan[str(doc)][1].count("A") == 1
    results = tmp_path / "results"
    results.mkdir()
    (results / "alpha.md").write_text("A\n")
    (results / "beta.md").write_text("B\n")
    assert update_docs.main(["--results", str(results), str(doc)]) == 0  # alpha spliced all the same
    assert "results no doc quotes: beta" in capsys.readouterr().err
    assert update_docs.main(["--check", "--results", str(results), str(doc)]) == 1


def test_main_writes_then_checks_clean(tmp_path, capsys):
    results = tmp_path / "results"
    _results(results).write()
    doc = tmp_path / "README.md"
    doc.write_text("# Bench\n\n<!-- results:demo_bench -->\nold figures\n<!-- /results -->\n")
    assert update_docs.main(["--check", "--results", str(results), str(doc)]) == 1
    assert "old figures" in doc.read_text()  # --check changes nothing
    assert update_docs.main(["--results", str(results), str(doc)]) == 0
    text = doc.read_text()
    assert "old figures" not in text and text.count("Caption of the table") == 1
    assert text.count((results / "demo_bench.md").read_text().strip()) == 1
    assert update_docs.main(["--check", "--results", str(results), str(doc)]) == 0
    doc.write_text(text + "<!-- results:demo_bench -->\n<!-- /results -->\n")
    assert update_docs.main(["--results", str(results), str(doc)]) == 2  # quoted twice: refused, nothing written
    assert "second time" in capsys.readouterr().err

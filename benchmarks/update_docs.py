"""Put the benchmarks' current results into the docs.

Every benchmark writes the tables it printed to ``benchmarks/results/<script>.md`` (``<script>.avx2.md`` on an
AVX2-only CPU, quoted as ``<!-- results:<script>.avx2 -->``). A doc quotes one
between two marker lines, and this script replaces whatever lies between them with that file:

    <!-- results:index_throughput -->
    ...the content of benchmarks/results/index_throughput.md...
    <!-- /results -->

A doc that wants some of a file's tables only names them, counted from 1: ``<!-- results:shard_scale#1,3 -->``
quotes the file's header line and its first and third tables, each with its caption and notes.

    python benchmarks/update_docs.py            # rewrite benchmarks/README.md and README.md where they have markers
    python benchmarks/update_docs.py --check    # exit 1 if a doc differs from its results files, change nothing

It refuses (exit 2, nothing written) a marker left open, a closing marker without its opening one, a
results name quoted twice in one doc, and a name without a results file. A results file that no doc
quotes is named on stderr (and fails ``--check``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
DOCS = (os.path.join(ROOT, "benchmarks", "README.md"), os.path.join(ROOT, "README.md"))

ANY = re.compile(r"^<!-- (?:results:([A-Za-z0-9_.-]+(?:#[0-9]+(?:,[0-9]+)*)?)|(/results)) -->[ \t]*$", re.M)


class SpliceError(ValueError):
    """The markers of a doc, or the results they name, do not allow a clean splice; the message says where."""


def spans(text: str, where: str = "doc") -> List[Tuple[str, int, int]]:
    """(name, start of the content, end of the content) of every marker pair, in order; SpliceError for a pair
    left open, nested, or closed without its opening line, and for a name quoted twice."""
    found, open_at, seen = [], None, set()
    for m in ANY.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group(1):
            if open_at is not None:
                raise SpliceError(f"{where}:{line}: results:{m.group(1)} opens inside results:{open_at[0]} "
                                  f"(line {open_at[2]}), which is not closed")
            if m.group(1) in seen:
                raise SpliceError(f"{where}:{line}: results:{m.group(1)} is quoted a second time")
            seen.add(m.group(1))
            open_at = (m.group(1), m.end() + (text[m.end() : m.end() + 1] == "\n"), line)
        else:
            if open_at is None:
                raise SpliceError(f"{where}:{line}: <!-- /results --> without an opening <!-- results:NAME -->")
            found.append((open_at[0], open_at[1], m.start()))
            open_at = None
    if open_at is not None:
        raise SpliceError(f"{where}:{open_at[2]}: results:{open_at[0]} is never closed (<!-- /results -->)")
    return found


def splice(text: str, results: Mapping[str, str], where: str = "doc") -> str:
    """``text`` with the content between each marker pair replaced by ``results[name]`` (stripped, one
    blank line either side)."""
    out, pos = [], 0
    for key, start, end in spans(text, where):
        name, _, picked = key.partition("#")
        if name not in results:
            raise SpliceError(f"{where}: results:{key} names no results file ({name}.md)")
        content = results[name].strip()
        if picked:
            content = tables_of(content, [int(k) for k in picked.split(",")], f"{where}: results:{key}")
        out += [text[pos:start], "\n", content, "\n\n"]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def tables_of(content: str, picked: Sequence[int], where: str = "results") -> str:
    """The header line of a results file and its tables number ``picked`` (from 1), each with the paragraph
    before it (its caption) and the ones after it up to the next table's caption (its notes)."""
    paragraphs = content.strip().split("\n\n")
    tables = [i for i, p in enumerate(paragraphs) if i and all(line.startswith("|") for line in p.splitlines())]
    out = [paragraphs[0]]
    for k in picked:
        if not 1 <= k <= len(tables):
            raise SpliceError(f"{where}: table {k} asked for; the file has {len(tables)}")
        at = tables[k - 1]
        first = at - 1 if at - 1 > 0 and at - 1 not in tables else at
        following = max(at + 1, tables[k] - 1) if k < len(tables) else len(paragraphs)
        out += paragraphs[first:following]
    return "\n\n".join(out)


def quoted(text: str) -> List[str]:
    """The results files ``text`` quotes (any of their tables)."""
    return [key.partition("#")[0] for key, _, _ in spans(text)]


def load_results(folder: str = RESULTS_DIR) -> Dict[str, str]:
    """{script name: content} of every ``<name>.md`` in ``folder``."""
    out = {}
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if entry.endswith(".md"):
            with open(os.path.join(folder, entry), encoding="utf-8") as f:
                out[entry[: -len(".md")]] = f.read()
    return out


def update(docs: Sequence[str], results: Mapping[str, str]) -> Tuple[Dict[str, Tuple[str, str]], List[str]]:
    """({doc path: (text now, text spliced)} for every doc that exists, the results files no doc quotes);
    SpliceError if a doc's markers are broken or name a missing results file."""
    out, used = {}, set()
    for path in docs:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        where = os.path.relpath(path, ROOT)
        new = splice(text, results, where)
        used.update(quoted(text))
        out[path] = (text, new)
    return out, sorted(set(results) - used)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", nargs="*", help="docs to update (default: benchmarks/README.md and README.md)")
    parser.add_argument("--results", default=RESULTS_DIR, help="folder of the results files (default benchmarks/results)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a doc is not up to date")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        plan, unquoted = update(args.docs or DOCS, load_results(args.results))
    except SpliceError as e:
        print(f"update_docs: {e}", file=sys.stderr)
        return 2
    stale = [path for path, (old, new) in plan.items() if old != new]
    for path in stale:
        print(f"{'out of date' if args.check else 'updated'}: {os.path.relpath(path, ROOT)}")
        if not args.check:
            _write(path, plan[path][1])
    if unquoted:
        print(f"update_docs: results no doc quotes: {', '.join(unquoted)} (add <!-- results:NAME --> ... "
              f"<!-- /results --> where each belongs)", file=sys.stderr)
    if not stale:
        print("the docs quote the current results")
    return 1 if args.check and (stale or unquoted) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Building the flows costs what it needs: jina's check of a Flow's arguments against its whole command line's
help (~1.7 s a flow on 2 vCPUs) runs only for an argument it does not know."""

import jina.helper
import jina_cli.lookup
import pytest

from flows.serving import build_flows, free_port, skip_empty_argument_check
from flows.settings import Settings


def _spy(monkeypatch) -> list:
    calls = []

    def lookup_table():
        calls.append(1)
        return {}, {}

    monkeypatch.setattr(jina_cli.lookup, "_build_lookup_table", lookup_table)
    return calls


def test_building_both_flows_skips_the_lookup_of_no_unknown_argument(monkeypatch, tmp_path):
    calls = _spy(monkeypatch)
    index_flow, search_flow = build_flows(Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(),
                                                   model=str(tmp_path / "model"), device="cpu",
                                                   workspace=str(tmp_path / "ws")))
    assert {"indexer", "image_encoder"} <= {name for name, _ in index_flow}
    assert {"text_encoder", "indexer"} <= {name for name, _ in search_flow}
    assert calls == []


def test_an_unknown_argument_is_still_looked_up_and_warned(monkeypatch):
    skip_empty_argument_check()
    skip_empty_argument_check()  # twice: wrapped once
    calls = _spy(monkeypatch)
    jina.helper.warn_unknown_args(set())
    assert calls == []
    with pytest.warns(UserWarning, match="no-such-option"):
        jina.helper.warn_unknown_args({"--no-such-option"})
    assert calls == [1]

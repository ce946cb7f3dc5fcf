"""A flow's gateway starts once its executors listen: started beside them (jina's way) it asked a loading
executor for its endpoints, failed, and waited a whole second before asking again."""

import os
import signal
import time

import jina.orchestrate.deployments
import pytest
from jina import Executor, Flow, requests
from jina.excepts import RuntimeFailToStart

from flows.serving import dead_pods_close_at_once, free_port, gateway_starts_last, skip_empty_argument_check


class SlowToLoad(Executor):
    """Loads for a second (like an encoder its model), then says so in a file."""

    def __init__(self, marker: str = "", **kwargs):
        super().__init__(**kwargs)
        time.sleep(1.0)
        with open(marker, "w") as f:
            f.write("loaded")

    @requests
    def echo(self, docs, **kwargs):
        return docs


class FailsToLoad(Executor):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        raise RuntimeError("the model folder is empty")


def _flow(uses, **uses_with):
    skip_empty_argument_check()
    return Flow(host="127.0.0.1", port=free_port()).add(name="slow", uses=uses, uses_with=uses_with,
                                                         host="127.0.0.1")


def test_the_gateway_starts_after_its_executors_loaded(monkeypatch, tmp_path):
    marker = str(tmp_path / "loaded")
    started = []
    start = jina.orchestrate.deployments.Deployment.start

    def recording_start(self):
        started.append((self.name, os.path.exists(marker)))
        return start(self)

    monkeypatch.setattr(jina.orchestrate.deployments.Deployment, "start", recording_start)
    flow = _flow(SlowToLoad, marker=marker)
    gateway_starts_last(flow)
    gateway_starts_last(flow)  # twice: wrapped once
    with flow:
        answer = flow.post("/", inputs=[], return_responses=True)
    assert answer[0].status.code == 0
    assert started == [("slow", False), ("gateway", True)]


def test_an_executor_that_fails_to_load_fails_the_start_as_before(monkeypatch):
    started = []
    start = jina.orchestrate.deployments.Deployment.start
    monkeypatch.setattr(jina.orchestrate.deployments.Deployment, "start",
                        lambda self: started.append(self.name) or start(self))
    flow = _flow(FailsToLoad)
    gateway_starts_last(flow)
    with pytest.raises(RuntimeFailToStart):
        with flow:
            pass
    assert started == ["slow"]  # no gateway started for a flow that cannot serve


def test_a_flow_whose_executor_was_killed_closes_without_waiting_for_it(tmp_path):
    """jina waits 60 s (JINA_DEFAULT_TIMEOUT_CTRL) at close for every pod to report its shutdown; a killed
    one never does. The flow marks it shut down and closes at once."""
    flow = _flow(SlowToLoad, marker=str(tmp_path / "loaded"))
    dead_pods_close_at_once(flow)
    with flow:
        (pod,) = flow._deployment_nodes["slow"].shards[0]._pods
        os.kill(pod.worker.pid, signal.SIGKILL)
        pod.worker.join(10)
        closing = time.monotonic()
    took = time.monotonic() - closing
    assert not pod.worker.is_alive() and pod.is_shutdown.is_set()
    assert took < 30, f"closing took {took:.0f} s"

"""A flow's gateway starts once its executors listen: started beside them (jina's way) it asked a loading
executor for its endpoints, failed, and waited a whole second before asking again.

Each case runs in a Python process of its own, as a user's script would: jina forks the executors from the
process that enters the flow, and by now the test process runs gRPC's threads (its asyncio poller among
them), beside which a fork has crashed the test process."""

import json
import os
import signal
import subprocess
import sys
import time

import jina.orchestrate.deployments
from jina import Executor, Flow, requests
from jina.excepts import RuntimeFailToStart

from flows.serving import dead_pods_close_at_once, free_port, gateway_starts_last, skip_empty_argument_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def _in_a_fresh_process(case: str, folder) -> dict:
    """``case(folder)`` run in a new Python process; the JSON it printed last."""
    done = subprocess.run([sys.executable, "-c", f"import sys; from tests.e2e.test_flow_start import {case}; "
                           f"{case}(sys.argv[1])", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _recording_starts(record):
    """Deployment.start, noting each deployment's name and ``record(deployment)`` first."""
    start = jina.orchestrate.deployments.Deployment.start

    def recording_start(self):
        record(self)
        return start(self)

    jina.orchestrate.deployments.Deployment.start = recording_start


def gateway_after_executors(folder: str) -> None:
    marker = os.path.join(folder, "loaded")
    started = []
    _recording_starts(lambda d: started.append((d.name, os.path.exists(marker))))
    flow = _flow(SlowToLoad, marker=marker)
    gateway_starts_last(flow)
    gateway_starts_last(flow)  # twice: wrapped once
    with flow:
        answer = flow.post("/", inputs=[], return_responses=True)
    print(json.dumps({"code": answer[0].status.code, "started": started}))


def executor_fails_to_load(folder: str) -> None:
    started = []
    _recording_starts(lambda d: started.append(d.name))
    flow = _flow(FailsToLoad)
    gateway_starts_last(flow)
    raised = None
    try:
        with flow:
            pass
    except RuntimeFailToStart as e:
        raised = type(e).__name__
    print(json.dumps({"raised": raised, "started": started}))


def killed_executor_closes_at_once(folder: str) -> None:
    flow = _flow(SlowToLoad, marker=os.path.join(folder, "loaded"))
    dead_pods_close_at_once(flow)
    with flow:
        (pod,) = flow._deployment_nodes["slow"].shards[0]._pods
        os.kill(pod.worker.pid, signal.SIGKILL)
        pod.worker.join(10)
        closing = time.monotonic()
    print(json.dumps({"took": time.monotonic() - closing, "alive": pod.worker.is_alive(),
                      "shut_down": pod.is_shutdown.is_set()}))


def test_the_gateway_starts_after_its_executors_loaded(tmp_path):
    seen = _in_a_fresh_process("gateway_after_executors", tmp_path)
    assert seen["code"] == 0
    assert seen["started"] == [["slow", False], ["gateway", True]]


def test_an_executor_that_fails_to_load_fails_the_start_as_before(tmp_path):
    seen = _in_a_fresh_process("executor_fails_to_load", tmp_path)
    assert seen["raised"] == "RuntimeFailToStart"
    assert seen["started"] == ["slow"]  # no gateway started for a flow that cannot serve


def test_a_flow_whose_executor_was_killed_closes_without_waiting_for_it(tmp_path):
    """jina waits 60 s (JINA_DEFAULT_TIMEOUT_CTRL) at close for every pod to report its shutdown; a killed
    one never does. The flow marks it shut down and closes at once."""
    seen = _in_a_fresh_process("killed_executor_closes_at_once", tmp_path)
    assert not seen["alive"] and seen["shut_down"]
    assert seen["took"] < 30, f"closing took {seen['took']:.0f} s"

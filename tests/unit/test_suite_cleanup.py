"""The test suite leaves no folder of its own behind in the temporary directory."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_test_run_removes_its_cache_folder(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPSEEK_ONNX_CACHE", "CLIPSEEK_PRECISION_CACHE",
                                                             "PYTEST_ADDOPTS")}
    env["TMPDIR"] = str(tmp)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/unit/test_wire_format.py::test_a_field_it_cannot_write_is_named"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("clipseek-tests-")]

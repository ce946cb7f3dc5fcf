"""tests/avx2_cpuid.c: a process (and what it starts) sees an AVX2-only CPU, and faults that are not CPUID
still end the process as before, with Python's faulthandler report."""

import os
import platform
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _host_flags() -> set:
    """The CPU's flags as the kernel lists them (/proc/cpuinfo, which CPUID faulting does not change)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), ()))
    except OSError:
        return set()


pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or "cpuid_fault" not in _host_flags() or shutil.which("cc") is None,
    reason="needs x86-64 Linux with CPUID faulting (cpuid_fault in /proc/cpuinfo) and a C compiler")

SEES = ("import json, torch; from executors.models.precision import avx2_only, cpu_capabilities; "
        "print(json.dumps([avx2_only(), str(torch.backends.cpu.get_cpu_capability()), cpu_capabilities()]))")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cpuid") / "avx2_cpuid.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", out, os.path.join(ROOT, "tests", "avx2_cpuid.c"), "-ldl"],
                   check=True)
    return out


def _python(code, library=None, *flags):
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if library:
        env["LD_PRELOAD"] = library
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_process_and_its_children_see_avx2_only(library):
    import json

    code = ("import subprocess, sys, threading, os\n"
            f"print(subprocess.run([sys.executable, '-c', {SEES!r}], capture_output=True, text=True).stdout, end='')\n"
            "out = []\n"
            "thread = threading.Thread(target=lambda: out.append(subprocess.run([sys.executable, '-c', "
            f"{SEES!r}], capture_output=True, text=True).stdout))\n"
            "thread.start(); thread.join(); print(out[0], end='')\n"
            f"exec({SEES!r})\n")
    done = _python(code, library)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, done.stdout
    for line in lines:  # a child it started, a child a thread of it started, the process itself
        only, capability, caps = json.loads(line)
        assert only is True and capability == "AVX2", line
        assert caps["avx2"] and not caps["vnni"] and not caps["avx512_bf16"] and not caps["amx"], line


def test_a_real_fault_still_ends_the_process_and_faulthandler_reports_it(library):
    crash = "import ctypes; ctypes.string_at(0)"
    plain = _python(crash, library)
    assert plain.returncode == -signal.SIGSEGV, (plain.returncode, plain.stderr)
    reported = _python(crash, library, "-X", "faulthandler")
    assert reported.returncode == -signal.SIGSEGV, (reported.returncode, reported.stderr)
    assert "Fatal Python error: Segmentation fault" in reported.stderr, reported.stderr


def test_without_it_an_avx512_host_is_seen_as_it_is():
    """On a host with AVX-512 the process without the library is not AVX2-only: the library is what changes it."""
    import json

    if "avx512f" not in _host_flags():
        pytest.skip("the host has no AVX-512 to hide")
    done = _python(SEES)
    assert done.returncode == 0, done.stderr
    only, capability, _ = json.loads(done.stdout)
    assert only is False and capability != "AVX2", (only, capability)

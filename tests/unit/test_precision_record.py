"""auto's measurement is made once per machine and recorded, so every start decides alike."""

import json
import os
import subprocess
import sys

import pytest

from executors.models import precision

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_recorded_figures_are_reused_and_a_damaged_record_measured_again(tmp_path, monkeypatch):
    record = tmp_path / "cache" / "precision.json"
    monkeypatch.setenv(precision.PROBE_FILE_ENV, str(record))
    key = ("image", 768, 4, 50)
    assert precision.recorded(key, lambda: {"bfloat16": 3.0, "int8": 1.5}) == {"bfloat16": 3.0, "int8": 1.5}

    def never():
        raise AssertionError("measured again although this machine's figures are recorded")

    assert precision.recorded(key, never) == {"bfloat16": 3.0, "int8": 1.5}
    entry = json.loads(record.read_text())
    assert len(entry) == 1 and "measured_at" in next(iter(entry.values()))
    assert precision.recorded(("text", 512, 1, 16), lambda: {"bfloat16": 0.5}) == {"bfloat16": 0.5}  # its own key
    record.write_text("{not json")
    assert precision.recorded(key, lambda: {"bfloat16": 2.0}) == {"bfloat16": 2.0}
    assert precision.recorded(key, never) == {"bfloat16": 2.0}


def test_a_cpu_of_the_same_name_without_vnni_measures_again(tmp_path, monkeypatch):
    """"AMD EPYC" names parts with VNNI and AVX512-BF16 and parts without (and a CPU can hide them from a
    process): figures measured on one kind are not reused on the other."""
    monkeypatch.setenv(precision.PROBE_FILE_ENV, str(tmp_path / "precision.json"))
    key = ("image", 768, 4, 50)
    kinds = {"avx512_bf16": True, "amx": False, "vnni": True, "avx2": True}
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: dict(kinds))
    assert precision.recorded(key, lambda: {"int8": 1.8}) == {"int8": 1.8}
    kinds.update(avx512_bf16=False, vnni=False)
    assert precision.recorded(key, lambda: {"int8": 1.1}) == {"int8": 1.1}
    kinds.update(avx512_bf16=True, vnni=True)
    assert precision.recorded(key, lambda: {"int8": 0.5}) == {"int8": 1.8}  # the first kind's own figures
    assert len(json.loads((tmp_path / "precision.json").read_text())) == 2


def test_an_unwritable_record_costs_only_the_record(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(precision.PROBE_FILE_ENV, str(blocker / "precision.json"))  # under a file: no folder
    assert precision.recorded(("image", 1, 1, 1), lambda: {"int8": 1.25}) == {"int8": 1.25}
    monkeypatch.setenv(precision.PROBE_FILE_ENV, "")  # "" measures in every process
    assert precision.probe_file() is None


@pytest.mark.cpu_kind
def test_two_starts_choose_alike(tmp_path):
    """Two processes on one machine: the second reads the first one's figures and picks the same precision."""
    env = dict(os.environ, **{precision.PROBE_FILE_ENV: str(tmp_path / "precision.json")})
    code = ("from executors.models import precision as p; c = p.choose('auto', 'cpu', 'image'); "
            "print(c.name, '|', c.reason)")
    first, second = (subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                                    timeout=120) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and first.stdout.split("|")[1].strip().startswith("auto on cpu")
    assert len(json.loads((tmp_path / "precision.json").read_text())) == 1


# What an AVX2-only CPU leaves oneDNN and MKL: bfloat16 matmuls then run emulated (8x slower than float32 on
# such a CPU), while the CPU still reports avx512_bf16, so only a measurement can tell.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.skipif(not precision.native_bfloat16(), reason="the CPU has no native bfloat16 to hold back")
def test_auto_picks_by_measurement_not_by_the_cpus_name(tmp_path):
    """With the math libraries held to AVX2 on a CPU that names native bfloat16, bfloat16 measures slower than
    float32 and auto takes neither tower's bfloat16; its reason gives the figure it measured."""
    env = dict(os.environ, **AVX2_ONLY, **{precision.PROBE_FILE_ENV: str(tmp_path / "precision.json")})
    code = ("from executors.models import precision as p\n"
            "for tower in ('image', 'text'):\n"
            "    c = p.choose('auto', 'cpu', tower); print(tower, c.name, '|', c.reason)")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert set(lines) == {"image", "text"}
    for tower, line in lines.items():
        name, reason = (part.strip() for part in line.split("|"))
        measured = float(reason.split("bfloat16 ", 1)[1].split("x", 1)[0])
        assert measured < precision.MIN_SPEEDUP and name != "bfloat16", (tower, line)
    assert lines["text"].startswith("float32")


@pytest.mark.cpu_kind
@pytest.mark.skipif(precision.native_bfloat16() is not None, reason="the CPU runs bfloat16 natively (tests/avx2.sh runs this)")
def test_auto_never_tries_bfloat16_where_the_cpu_lacks_it(tmp_path, monkeypatch):
    """On a CPU without native bfloat16 (an AVX2-only one), where bfloat16 runs emulated, auto neither takes nor
    measures it for either tower, and says why."""
    monkeypatch.setenv(precision.PROBE_FILE_ENV, str(tmp_path / "precision.json"))
    for tower in ("image", "text"):
        chosen = precision.choose("auto", "cpu", tower)
        assert chosen.name in ("float32", "int8") and chosen.reason.endswith("(no native bfloat16)"), chosen
        assert "bfloat16" not in chosen.reason.replace("no native bfloat16", ""), chosen

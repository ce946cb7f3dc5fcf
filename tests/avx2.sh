#!/usr/bin/env bash
# Runs the tests whose answers depend on the CPU's instruction set (pytest marker `cpu_kind`) as on a CPU with
# AVX2 and FMA only (no AVX512, no VNNI, no native bfloat16), from any x86-64 machine. torch, fbgemm, oneDNN,
# ONNX Runtime, OpenBLAS and numpy ask the CPU (its CPUID instruction) what it can do and take the kernels it
# can run; this makes every process of the run get the answer of an AVX2-only CPU, in one of two ways:
#
#   cpuid  the host runs the code at its own speed, and CPUID traps into tests/avx2_cpuid.c (loaded with
#          LD_PRELOAD), which hides AVX-512, VNNI, bfloat16 and AMX: needs the kernel's CPUID faulting
#          (`cpuid_fault` in /proc/cpuinfo) and a C compiler. The flows run, so tests/e2e's cpu_kind tests run.
#   qemu   Python runs under QEMU's user-mode emulation of a Haswell CPU (`apt-get install qemu-user`, 7.2 or
#          later): any x86-64 host, 100-200x slower, answers only. Flows do not run there (QEMU 7.2 aborts
#          when jina's fork server forks), so tests/e2e is left out.
#
#   bash tests/avx2.sh                       # the cpu_kind tests, by cpuid where the host can, else qemu
#   AVX2_BY=qemu bash tests/avx2.sh          # choose the way
#   bash tests/avx2.sh -m "not gpu" tests    # extra arguments go to pytest (a later -m wins)
#   bash tests/avx2.sh --python-only         # only write and check .venv/bin/python-avx2, which runs anything
#   .venv/bin/python-avx2 benchmarks/index_throughput.py   # so (cpuid: at the host's speed, cores and caches)
#
# Uses .venv (or $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -m)" = x86_64 ] || { echo "tests/avx2.sh runs an x86-64 Python: this machine is $(uname -m)" >&2; exit 2; }
python=$(realpath -s "${PYTHON:-.venv/bin/python}")
wrapper="$(dirname "$python")/python-avx2"
by=${AVX2_BY:-}
if [ -z "$by" ]; then
  if grep -qw cpuid_fault /proc/cpuinfo && command -v cc >/dev/null; then by=cpuid; else by=qemu; fi
fi
case "$by" in
cpuid)
  grep -qw cpuid_fault /proc/cpuinfo || { echo "no CPUID faulting here (cpuid_fault in /proc/cpuinfo): AVX2_BY=qemu" >&2; exit 2; }
  library="$(dirname "$python")/../lib/avx2_cpuid.so"
  # built beside and moved in place, so that a run using the library already is left alone
  cc -O2 -shared -fPIC -o "$library.$$" tests/avx2_cpuid.c -ldl && mv -f "$library.$$" "$library"
  library=$(realpath "$library")
  cat >"$wrapper" <<EOF
#!/bin/sh
# $python with the CPU reporting AVX2 only (written by tests/avx2.sh): CPUID traps into $library. Processes
# that Python starts inherit LD_PRELOAD, so they see the same CPU.
LD_PRELOAD="$library\${LD_PRELOAD:+:\$LD_PRELOAD}" exec "$python" "\$@"
EOF
  leave_out=()
  ;;
qemu)
  command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 not found: apt-get install qemu-user" >&2; exit 2; }
  # Haswell as QEMU's TCG can run it: the features it does not emulate are left out (else it warns at every start)
  cpu="Haswell,-pcid,-x2apic,-tsc-deadline,-hle,-invpcid,-rtm"
  # numpy's own AVX2 kernels are left out (its baseline, SSE4.2, stays): under QEMU 7.2 its AVX2 sorts
  # (argsort, argpartition: x86-simd-sort) give wrong orders and can crash, a fault of the emulation, not of
  # numpy. BLAS, torch, fbgemm, oneDNN and ONNX Runtime keep their AVX2 kernels.
  cat >"$wrapper" <<EOF
#!/bin/sh
# $python on an emulated AVX2-only CPU (written by tests/avx2.sh). argv[0] is this file, so sys.executable is
# too: processes that Python starts run emulated as well.
NPY_DISABLE_CPU_FEATURES=X86_V3 exec qemu-x86_64 -cpu $cpu -0 "$wrapper" "$python" "\$@"
EOF
  leave_out=(--ignore=tests/e2e)
  ;;
*) echo "AVX2_BY is cpuid or qemu, not $by" >&2; exit 2 ;;
esac
chmod +x "$wrapper"
"$wrapper" - "$by" <<'EOF'
import sys
import torch
from executors.models.precision import avx2_only, cpu_capabilities
seen = f"torch's kernels {torch.backends.cpu.get_cpu_capability()}, {cpu_capabilities()}"
if not avx2_only():
    sys.exit(f"the CPU is not AVX2-only ({sys.argv[1]}): {seen}")
print(f"AVX2-only CPU by {sys.argv[1]}: {seen}", flush=True)
EOF
if [ "${1:-}" = --python-only ]; then echo "written: $wrapper"; exit 0; fi
exec "$wrapper" -m pytest -q -p no:cacheprovider -m cpu_kind "${leave_out[@]}" "$@"

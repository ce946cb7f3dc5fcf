#!/usr/bin/env bash
# Runs the tests whose answers depend on the CPU's instruction set (pytest marker `cpu_kind`) as on a CPU with
# AVX2 and FMA only (no AVX512, no VNNI, no native bfloat16), from any x86-64 machine: Python runs under QEMU's
# user-mode emulation of a Haswell CPU, so torch, fbgemm, oneDNN, ONNX Runtime and numpy see that CPU and take the
# kernels they take on one (every process the tests start runs emulated too). Emulation runs the math 100-200x
# slower than the host: this checks answers, never speed (benchmarks/ measure speed on a real CPU).
#
#   bash tests/avx2.sh                # the cpu_kind tests
#   bash tests/avx2.sh -k onnx        # extra arguments go to pytest
#
# Needs qemu-user 7.2 or later (AVX2 emulation): `apt-get install qemu-user`. Uses .venv (or $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -m)" = x86_64 ] || { echo "tests/avx2.sh runs an x86-64 Python: this machine is $(uname -m)" >&2; exit 2; }
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 not found: apt-get install qemu-user" >&2; exit 2; }
python=$(realpath -s "${PYTHON:-.venv/bin/python}")
wrapper="$(dirname "$python")/python-avx2"
# Haswell as QEMU's TCG can run it: the features it does not emulate are left out (else it warns at every start)
cpu="Haswell,-pcid,-x2apic,-tsc-deadline,-hle,-invpcid,-rtm"
# numpy's own AVX2 kernels are left out (its baseline, SSE4.2, stays): under QEMU 7.2 its AVX2 sorts (argsort,
# argpartition: x86-simd-sort) give wrong orders and can crash, a fault of the emulation, not of numpy. BLAS,
# torch, fbgemm, oneDNN and ONNX Runtime keep their AVX2 kernels.
cat >"$wrapper" <<EOF
#!/bin/sh
# $python on an emulated AVX2-only CPU (written by tests/avx2.sh). argv[0] is this file, so sys.executable is
# too: processes that Python starts run emulated as well.
NPY_DISABLE_CPU_FEATURES=X86_V3 exec qemu-x86_64 -cpu $cpu -0 "$wrapper" "$python" "\$@"
EOF
chmod +x "$wrapper"
"$wrapper" - <<'EOF'
import sys
import torch
from executors.models.precision import avx2_only, cpu_capabilities
seen = f"torch's kernels {torch.backends.cpu.get_cpu_capability()}, {cpu_capabilities()}"
if not avx2_only():
    sys.exit(f"the emulated CPU is not AVX2-only: {seen}")
print(f"emulated CPU: {seen}", flush=True)
EOF
exec "$wrapper" -m pytest -q -p no:cacheprovider -m cpu_kind "$@"

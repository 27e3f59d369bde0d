#!/usr/bin/env bash
# mmar's GPU checks in one go, at most 8 minutes on one CUDA GPU -> benchmarks/results-gpu.md:
#   the tests marked `cuda`; bf16 training throughput and MFU of the small, base and qwen2-0.5b presets
#   against this GPU's own bf16 matmul peak; a 1-GPU FSDP run of the qwen2-0.5b preset; sampling images/s
#   from its checkpoint at the default settings and at MAR's reference ones; peak GPU memory of each.
# benchmarks/bench_gpu.py measures; this script checks its arguments and whether there is a GPU at all.
# Without one it says so and exits 0.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: bash benchmarks/gpu.sh [--out FILE] [--budget SECONDS] [--skip-tests]

  --out FILE         the report (default: benchmarks/results-gpu.md)
  --budget SECONDS   time for the measurements, at most 450 (default 450; the whole run stays under 8 min)
  --skip-tests       do not run the tests marked cuda
  -h, --help         this text

Python: $PYTHON, else .venv/bin/python (make setup), else python3.
USAGE
}

out=benchmarks/results-gpu.md
budget=450
extra=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --out | --budget)
            if (($# < 2)); then echo "gpu.sh: $1 needs a value" >&2; exit 2; fi
            if [[ $1 == --out ]]; then out=$2; else budget=$2; fi
            shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        --budget=*) budget=${1#--budget=}; shift ;;
        --skip-tests) extra+=(--skip-tests); shift ;;
        *) echo "gpu.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
if ! [[ $budget =~ ^[0-9]+$ ]] || ((budget < 1 || budget > 450)); then
    echo "gpu.sh: --budget must be a whole number of seconds from 1 to 450, not '$budget'" >&2
    exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
if ! gpus=$("$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)'); then
    echo "gpu.sh: cannot import torch with $python (run make setup, or set PYTHON)" >&2
    exit 1
fi
if [[ $gpus == 0 ]]; then
    echo "gpu.sh: no CUDA GPU here (torch sees none); nothing measured, $out left as it is"
    exit 0
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# 480 s in all: the measurements stop themselves within --budget; this only catches a hang (the report is
# rewritten after every part, so what was measured stays)
exec timeout --signal=INT --kill-after=20 480 "$python" benchmarks/bench_gpu.py --out "$out" --budget "$budget" \
    ${extra[@]+"${extra[@]}"}

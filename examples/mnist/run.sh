#!/usr/bin/env bash
# `make example-mnist`: real handwritten digits through the ordinary stage commands, everything under
# runs/example-mnist/. Copy it and change the first command (and the presets) for your own labelled images.
set -euo pipefail
cd "$(dirname "$0")/../.."
MMAR="${MMAR:-.venv/bin/mmar}"
PYTHON="${PYTHON:-.venv/bin/python}"
RUN=runs/example-mnist
start=$SECONDS

step() {  # print the command, run it, say how long it took
    echo "\$ $*"
    local t=$SECONDS
    "$@"
    echo "  ($(( SECONDS - t )) s)"
}

rm -rf "$RUN"
step "$PYTHON" examples/mnist/make_shards.py --out "$RUN/shards"                      # img2dataset-style .tar
step "$MMAR" tokenize --config configs/tokenize/mnist.yaml                            # -> $RUN/data/{train,val,test}
step "$MMAR" pretrain --config configs/pretrain/mnist.yaml                            # -> $RUN/pretrain/final
step "$MMAR" finetune --config configs/finetune/mnist.yaml                            # -> $RUN/finetune/final
step "$MMAR" evaluate --config configs/evaluate/mnist.yaml                            # -> $RUN/eval/report.md
"$PYTHON" examples/mnist/summary.py "$RUN/eval/metrics.json" --seconds $(( SECONDS - start ))
echo "report: $RUN/eval/report.md"

#!/usr/bin/env bash
# On the device machine: bench/train_throughput.py with the carried wheels (.whl: bitsandbytes, liger-kernel,
# pydantic, ...). Arguments go to the benchmark; its JSON lands in $OUT/train_throughput.json.
set -uo pipefail
source bench/gpu_common.sh
python3 -m bench.train_throughput --out "$OUT/train_throughput.json" "$@"

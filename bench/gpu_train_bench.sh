#!/usr/bin/env bash
# On the device machine: bench/train_throughput.py with the carried wheels (.whl: bitsandbytes, liger-kernel,
# pydantic, ...). Arguments go to the benchmark; its JSON lands in $OUT/train_throughput.json.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m bench.train_throughput --out "$OUT/train_throughput.json" "$@"

#!/usr/bin/env bash
# On the device machine: issue #16's throughput measurements, one call each (each well under the 10-minute limit):
#   bash bench/gpu_speed.sh t4        hf (bf16, the reference), hf_fp16 and relaytune as a T4 resolves it
#                                     (--emulate t4: capability 7.5, no bf16, 15.0 GiB)
#   bash bench/gpu_speed.sh bf16      hf and relaytune three times: the median of 3 repeats in one call
#   bash bench/gpu_speed.sh unsloth   hf and Unsloth (carry .wheels too: Unsloth's wheels), or the error that stops it
# Carry .whl (bitsandbytes slimmed by bench/slim_wheel.py to the image's CUDA 13 library, liger-kernel, pydantic).
# JSON and logs land in $OUT; a short table is printed last.
set -uo pipefail
source bench/gpu_common.sh
case "${1:-}" in
  t4) python3 -m bench.train_throughput --emulate t4 --contenders hf,hf_fp16,relaytune --out "$OUT/t4.json" \
        > "$OUT/t4.log" 2>&1 ;;
  bf16) python3 -m bench.train_throughput --contenders hf,relaytune --variant relaytune_2= --variant relaytune_3= \
        --out "$OUT/bf16.json" > "$OUT/bf16.log" 2>&1 ;;
  unsloth)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl
    python3 -c "import unsloth" > "$OUT/unsloth_import.log" 2>&1 || { echo "unsloth does not import:"; tail -5 "$OUT/unsloth_import.log"; }
    python3 -m bench.train_throughput --contenders hf,unsloth --out "$OUT/unsloth.json" > "$OUT/unsloth.log" 2>&1 ;;
  *) echo "usage: bench/gpu_speed.sh t4|bf16|unsloth" >&2; exit 2 ;;
esac
tail -8 "$OUT/$1.log"

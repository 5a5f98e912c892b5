#!/usr/bin/env bash
# On the device machine: issue #16's throughput measurements, one call each (each well under the 10-minute limit):
#   bash bench/gpu_speed.sh t4        hf (bf16, the reference), hf_fp16 and relaytune as a T4 resolves it
#                                     (--emulate t4: capability 7.5, no bf16, 15.0 GiB)
#   bash bench/gpu_speed.sh bf16      hf and relaytune three times: the median of 3 repeats in one call
#   bash bench/gpu_speed.sh unsloth   hf and Unsloth (carry .wheels too: Unsloth's wheels), or the error that stops it
#   bash bench/gpu_speed.sh levers    hf, the default, the default with checkpointing forced on, the lean setting with
#                                     and without compiled layers, and the emulated T4: what each lever gives
#   bash bench/gpu_speed.sh goals_bf16     issue #16's bf16 goal: hf and relaytune three times, with --goals
#   bash bench/gpu_speed.sh goals_t4_lean  its other two: hf, the emulated T4 against hf_fp16 emulated with it, and
#                                          the lean setting, with --goals
#   bash bench/gpu_speed.sh fsdp   issue #17 on one GPU: QLoRA under FSDP (refused), a full fine-tune without FSDP,
#                                  and the same under FSDP on one process with CPU offload (few rows: a CPU Adam step
#                                  over 7B fp32 parameters takes seconds)
#   bash bench/gpu_speed.sh qlora_fsdp   issue #17's QLoRA-FSDP on one process against plain QLoRA, both eager
#                                        and both with compiled layers
#   (all seven contenders do not fit one 10-minute device call: a relaytune contender takes 2-3 min to load,
#   compile and fit its budget)
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
  levers) TORCHDYNAMO_VERBOSE=1 python3 -m bench.train_throughput --contenders hf,relaytune \
        --variant relaytune_gc=gradient_checkpointing=true --variant lean1024=micro_batch_tokens=1024 \
        --variant lean1024_eager=micro_batch_tokens=1024,compile=false --variant t4=emulate=t4 \
        --out "$OUT/levers.json" > "$OUT/levers.log" 2>&1 ;;
  goals_bf16) python3 -m bench.train_throughput --goals --contenders hf,relaytune --variant relaytune_2= \
        --variant relaytune_3= --out "$OUT/goals_bf16.json" > "$OUT/goals_bf16.log" 2>&1 ;;
  goals_t4_lean) python3 -m bench.train_throughput --goals --contenders hf \
        --variant hf_fp16_t4=contender=hf_fp16,emulate=t4 --variant t4=emulate=t4 \
        --variant lean=micro_batch_tokens=1024 \
        --out "$OUT/goals_t4_lean.json" > "$OUT/goals_t4_lean.log" 2>&1 ;;
  fsdp) python3 -m bench.train_throughput --contenders "" --rows 40 --warmup 1 --variant qlora_fsdp=distributed=fsdp \
        --variant 'full=train.method="full",distributed=ddp' \
        --variant 'full_fsdp_offload=train.method="full",distributed=fsdp,fsdp_cpu_offload=true' \
        --out "$OUT/fsdp.json" > "$OUT/fsdp.log" 2>&1 ;;
  qlora_fsdp) python3 -m bench.train_throughput --contenders "" --rows 64 --warmup 2 \
        --variant qlora_eager=compile=false --variant qlora_fsdp=distributed=fsdp,compile=false \
        --variant qlora=compile=true --variant qlora_fsdp_compiled=distributed=fsdp,compile=true \
        --out "$OUT/qlora_fsdp.json" > "$OUT/qlora_fsdp.log" 2>&1 ;;
  *) echo "usage: bench/gpu_speed.sh t4|bf16|unsloth|levers|goals_bf16|goals_t4_lean|fsdp|qlora_fsdp" >&2; exit 2 ;;
esac
tail -8 "$OUT/$1.log"

#!/usr/bin/env bash
# On the device machine, with every GPU it has (1 on nvidia-h100-x1, 2 on nvidia-h200-x2):
#   1. train_epoch1 under an outside launcher (torchrun, one process per GPU; NCCL), then train_epoch2 on one process,
#      on the tiny base and the real synthetic data; and train_epoch1 on one plain process, to compare adapters
#      (layers not compiled: compiling a 2-layer model costs minutes and measures nothing here);
#   2. bench/train_throughput.py on the 7B-shaped model: relaytune on one plain process, and under torchrun on every
#      GPU (on a one-GPU host: the DDP wrapper alone): tokens/s and the scaling efficiency.
# About 9 minutes on an H100. Carry .whl, .gpucheck/tiny-base and .gpucheck/train.jsonl (the README's "Checks on a GPU
# host" says how they are made). JSON and logs land in $OUT.
set -uo pipefail
source bench/gpu_common.sh
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
quiet() { grep -vE "it/s|step/s|examples/s|^\s*$" | tail -4; }

export RELAYTUNE_COMPILE=false
workdir /tmp/ddp && sed -i 's|^  dropout: .*|  dropout: 0.0|' /tmp/ddp/params.yaml
(cd /tmp/ddp && python3 -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m stages.train_epoch --epoch 1 2>&1 | quiet
 RELAYTUNE_NUM_PROCESSES=1 python3 -m stages.train_epoch --epoch 2 2>&1 | quiet)
workdir /tmp/plain && cp /tmp/ddp/params.yaml /tmp/plain/
(cd /tmp/plain && RELAYTUNE_NUM_PROCESSES=1 python3 -m stages.train_epoch --epoch 1 2>&1 | quiet)
tar -C /tmp/ddp -cf "$OUT/ddp_epochs.tar" models/epoch1/manifest.json models/epoch2/manifest.json metrics
unset RELAYTUNE_COMPILE

python3 -m bench.train_throughput --contenders relaytune --warmup 4 --variant "ddp$GPUS=processes=$GPUS" \
  --out "$OUT/train_throughput_ddp.json" > "$OUT/bench.log" 2>&1 || tail -20 "$OUT/bench.log"

python3 - <<'PY'
import json
from safetensors.torch import load_file
ddp, plain = (load_file(f"/tmp/{d}/models/epoch1/adapter_model.safetensors") for d in ("ddp", "plain"))
diff = max((ddp[k].float() - plain[k].float()).abs().max().item() for k in ddp)
print(f"\n{'run':<34}{'procs':>6}{'backend':>9}{'steps':>6}{'loss last':>11}{'tok/s':>9}{'peak GiB':>10}")
for name, path in [("epoch 1, torchrun", "/tmp/ddp/models/epoch1/manifest.json"),
                   ("epoch 2, one process", "/tmp/ddp/models/epoch2/manifest.json"),
                   ("epoch 1, one process (reference)", "/tmp/plain/models/epoch1/manifest.json")]:
    try:
        m = json.load(open(path))
    except OSError as e:
        print(f"{name:<34}FAILED ({e})"); continue
    h = m["host"]
    print(f"{name:<34}{h['num_processes']:>6}{str(h['distributed_backend']):>9}{m['global_step']:>6}"
          f"{json.load(open(path.replace('manifest.json', 'trainer_state.json')))['history'][-1]['loss']:>11.4f}"
          f"{m['tokens_per_second']:>9.0f}{h['peak_memory_gib']:>10.3f}")
print(f"epoch-1 adapter, torchrun vs one process: max abs diff {diff:.3g}")
try:
    r = json.load(open(__import__("os").environ["OUT"] + "/train_throughput_ddp.json"))
    print(f"\n7B-shaped QLoRA on {r['gpu']}")
    for name, c in r["contenders"].items():
        mix = c.get("realistic_mix", {})
        print(f"{name:<12}{c.get('processes', 1):>3} proc  {mix.get('real_tokens_per_s', c.get('error'))} tok/s  "
              f"peak {mix.get('peak_memory_gib')} GiB  step1 loss {mix.get('first_losses', [None])[0]}  "
              f"scaling {mix.get('scaling_efficiency_vs_relaytune', '-')}")
except (OSError, KeyError) as e:
    print("bench: no result", e)
PY

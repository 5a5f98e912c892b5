#!/usr/bin/env bash
# On the device machine: a QLoRA epoch made on the GPU (for the CPU to continue), and a CPU-made epoch continued on
# the GPU. Carry .whl (bitsandbytes, dvclive, pydantic, datasets and their missing deps) and .gpucheck
# (tiny-base/, train.jsonl, cpu-epoch1/), made here as the README's "Checks on a GPU host" says.
set -uo pipefail
source bench/gpu_common.sh
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'bf16', torch.cuda.is_bf16_supported())"

workdir /tmp/gpu-made
(cd /tmp/gpu-made && python3 -m stages.train_epoch --epoch 1 2>&1 | grep -vE "it/s|step/s|examples/s" | tail -5)

workdir /tmp/cpu-then-gpu
cp -r .gpucheck/cpu-epoch1 /tmp/cpu-then-gpu/models/epoch1
(cd /tmp/cpu-then-gpu && python3 -m stages.train_epoch --epoch 2 2>&1 | grep -vE "it/s|step/s|examples/s" | tail -5)

tar -C /tmp/gpu-made -cf "$OUT/gpu_epoch1.tar" models/epoch1 metrics dvclive
tar -C /tmp/cpu-then-gpu -cf "$OUT/cpu_then_gpu_epoch2.tar" models/epoch2/manifest.json models/epoch2/trainer_state.json metrics

python3 - <<'PY'
import json
print(f"{'run':<28}{'device':<26}{'dtype':<10}{'steps':>6}{'loss first':>12}{'loss last':>11}{'tok/s':>9}{'peak GiB':>10}{'wall s':>8}")
for name, path in [("epoch 1 on GPU", "/tmp/gpu-made/metrics/train_epoch1.json"),
                   ("epoch 2 on GPU after CPU", "/tmp/cpu-then-gpu/metrics/train_epoch2.json")]:
    try:
        m = json.load(open(path))
    except OSError as e:
        print(f"{name:<28}FAILED ({e})"); continue
    print(f"{name:<28}{m['device']:<26}{m['dtype']:<10}{m['steps']:>6}{m['loss_first']:>12.4f}{m['loss_last']:>11.4f}"
          f"{m['tokens_per_second']:>9.0f}{m['peak_memory_gib']:>10.3f}{m['wall_seconds']:>8.1f}")
PY

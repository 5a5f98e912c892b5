# Sourced by the bench/gpu_*.sh scripts on the device machine: the carried wheels (.whl), offline settings, NVLink
# multicast off (these hosts share their GPUs: KINDS.md), and `workdir DIR`: a minimal checkout that trains on the tiny
# base model (.gpucheck/tiny-base) with the real synthetic data (.gpucheck/train.jsonl).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RELAYTUNE_CACHE=/tmp/rtcache TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

workdir() {
  mkdir -p "$1/data/audit" "$1/models"
  cp -r relaytune stages params.yaml "$1/"
  cp -r .gpucheck/tiny-base "$1/tiny-base"
  cp .gpucheck/train.jsonl "$1/data/audit/train.jsonl"
  sed -i 's|^  base: .*|  base: tiny-base|' "$1/params.yaml"
}

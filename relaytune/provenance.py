"""What produced an output: host, accelerator, dtype, seed, base model, library versions and the stage's wall time."""

from __future__ import annotations

import platform
import socket
import sys
import time
from importlib import metadata

TRACKED_LIBRARIES = [
    "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
    "tokenizers", "openai", "bert-score", "dvc", "dvclive", "pydantic",
]


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def accelerator() -> dict:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "kind": "cuda",
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "compute_capability": f"{props.major}.{props.minor}",
        }
    return {"kind": "cpu", "name": cpu_model_name(), "threads": torch.get_num_threads()}


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def inference_dtype(requested: str) -> str:
    """bf16 where the GPU supports it, fp16 on older GPUs (T4, P100), fp32 on CPU, unless params name one."""
    if requested != "auto":
        return requested
    import torch

    if not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def stage_wall_seconds() -> float:
    """Seconds since this process started: a stage's wall time, imports and model loading included."""
    import psutil

    return round(time.time() - psutil.Process().create_time(), 1)


def provenance(*, stage: str, seed: int, base_model_hash: str | None, dtype: str | None,
               adapter_parent: str | None = None, extra: dict | None = None) -> dict:
    return {
        "stage": stage,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": stage_wall_seconds(),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform()},
        "accelerator": accelerator(),
        "dtype": dtype,
        "seed": seed,
        "base_model_hash": base_model_hash,
        "adapter_parent": adapter_parent,
        "libraries": library_versions(),
        **(extra or {}),
    }

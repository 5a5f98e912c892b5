"""Host profile: knobs that fit a run to one machine without changing the math, so they never break the chain.

They come from `host.yaml` at the repository root (git-ignored, not a DVC dep) and RELAYTUNE_* environment
variables, which win. Every epoch records the profile it ran with in its manifest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from .errors import RelaytuneError
from .io import read_yaml
from .params import StrictModel, describe_validation_error

HOST_PROFILE_FILE = "host.yaml"
ENV_PREFIX = "RELAYTUNE_"


class HostProfile(StrictModel):
    # Rows per forward/backward; the stage accumulates gradients to reach train.effective_batch_size.
    # null: the whole effective batch in one micro-batch.
    micro_batch_size: int | None = Field(None, ge=1)
    # null: on with a GPU (memory is the budget there), off on a CPU (where it only costs time).
    gradient_checkpointing: bool | None = None
    # null: transformers' default (sdpa where available).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    # Training compute dtype: auto = bf16 where the GPU supports it, fp16 with loss scaling on older GPUs
    # (T4, P100), fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


def load_host_profile(path: str | Path = HOST_PROFILE_FILE, environ: dict | None = None) -> HostProfile:
    environ = os.environ if environ is None else environ
    raw = read_yaml(path) if Path(path).exists() else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RelaytuneError(f"{path}: expected a mapping of host knobs")
    for name in HostProfile.model_fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            raw[name] = None if value.lower() in ("", "null", "none") else value
    try:
        return HostProfile.model_validate(raw)
    except ValidationError as err:
        raise RelaytuneError(describe_validation_error(err, f"{path} / {ENV_PREFIX}* environment", HostProfile)) from None


def use_gradient_checkpointing(host: HostProfile, device: str) -> bool:
    return host.gradient_checkpointing if host.gradient_checkpointing is not None else device == "cuda"

"""Host profile: knobs that fit a run to one machine without changing the math, so they never break the chain. They
come from `host.yaml` at the repository root (git-ignored, not a DVC dep) and RELAYTUNE_* environment variables,
which win; every epoch records the profile it asked for and the one that ran in its manifest.
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
    """Each knob's null means "pick for this machine": `effective_profile` resolves it, and the manifest records both
    what was asked and what ran."""

    # Training processes (DDP, one per GPU): each optimizer step's rows are dealt out across them, so the math stays
    # that of one process. null: one per visible GPU (one on a CPU). A stage started by `accelerate launch` or
    # `torchrun` runs with the launcher's processes instead. Several CPU processes use gloo (tests).
    num_processes: int | None = Field(None, ge=1)
    # How the processes share the model: ddp (each holds all of it) or fsdp (PyTorch's FSDP2: parameters, gradients
    # and optimizer state sharded over them, one unit per decoder layer; relaytune/sharding.py). null: ddp for LoRA
    # and QLoRA; fsdp for a full fine-tune whose training state (16 bytes a parameter) fills more of the card than a
    # token budget may. An FSDP epoch continues under DDP or one process and vice versa.
    distributed: Literal["ddp", "fsdp"] | None = None
    # fsdp: keep parameters, gradients and optimizer state in (pinned) CPU memory, on the GPU only while a unit
    # computes; the optimizer step runs on the CPU. For a model whose sharded state still does not fit.
    fsdp_cpu_offload: bool = False
    # Rows per forward/backward in each process; the stage accumulates gradients to reach
    # train.effective_batch_size. null: the process's whole share of the effective batch in one micro-batch.
    micro_batch_size: int | None = Field(None, ge=1)
    # Concatenate each micro-batch's rows into one padding-free sequence whose position ids restart per row.
    # null: on with a GPU; off on a CPU, where attention over a packed row costs the whole square (slower on
    # SmolLM2). The run first checks that the model keeps packed rows apart (a row's logits must not change when
    # its neighbour does); a model that leaks trains padded instead, and the manifest says so.
    packing: bool | None = None
    # Tokens per micro-batch at most (a row is never split; a longer one goes alone). null: fitted to the card at
    # setup on a GPU (train_model.fit_token_budget: probe micro-batches measure the memory per token, the budget
    # fills 80% of the card; more tokens per micro-batch, fewer fixed costs per token), no limit on a CPU.
    micro_batch_tokens: int | None = Field(None, ge=16)
    # null: on with a GPU (memory is the budget there), off on a CPU (where it only costs time).
    gradient_checkpointing: bool | None = None
    # null: flex_attention on a GPU with bf16 (compute capability 8.0 or newer), which skips the blocks that packed
    # rows never attend to; transformers' default (sdpa) elsewhere.
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] | None = None
    # torch.compile each decoder layer (shapes dynamic, so packed rows of any length reuse one graph). null: on with
    # flex_attention (with sdpa's dense masks every new length recompiles, which costs more than it saves).
    compile: bool | None = None
    # Liger's Triton kernels: a fused linear cross-entropy that never materialises the vocabulary logits (plus RMSNorm,
    # RoPE and SwiGLU when the layers are not compiled). null: on where a CUDA GPU, liger-kernel and kernels for the
    # model type are present; if not, the manifest says why. true: required (the stage stops where it cannot run).
    liger_kernel: bool | None = None
    # QLoRA: hold the frozen weights that stay unquantized (embeddings, norms, output head) in fp32, as peft's
    # prepare_model_for_kbit_training does. null: yes, except when computing in bf16, where they stay bf16: that
    # halves the residual stream that checkpointing keeps, and bf16 has fp32's range (fp16 on a T4 does not).
    frozen_weights_fp32: bool | None = None
    # Training compute dtype: auto = bf16 where the GPU supports it, fp16 with loss scaling on older GPUs
    # (T4, P100), fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


def effective_profile(host: HostProfile, device: str, dtype: str, compute_capability: tuple[int, int] | None,
                      num_processes: int = 1) -> HostProfile:
    """The profile with every null resolved for this machine (`dtype`: the resolved compute dtype; `num_processes`:
    how many processes actually run). Pure."""
    gpu = device == "cuda"
    flex = gpu and compute_capability is not None and compute_capability >= (8, 0)
    attn = host.attn_implementation or ("flex_attention" if flex else None)
    return host.model_copy(update={
        "num_processes": num_processes,
        "packing": gpu if host.packing is None else host.packing,
        "micro_batch_tokens": host.micro_batch_tokens,  # null on a GPU: TrainingRun.setup fits it to the card
        "gradient_checkpointing": gpu if host.gradient_checkpointing is None else host.gradient_checkpointing,
        "attn_implementation": attn,
        # Compiled layers under FSDP were not measured (its hooks run inside each layer's call): off unless asked.
        "compile": (attn == "flex_attention" and host.distributed != "fsdp") if host.compile is None else host.compile,
        "frozen_weights_fp32": dtype != "bfloat16" if host.frozen_weights_fp32 is None else host.frozen_weights_fp32,
        "dtype": dtype,
    })


def fitted_token_budget(peaks: dict[int, int], usable_bytes: float, floor: int, ceiling: int) -> int:
    """Tokens per micro-batch that fit `usable_bytes`, from the peak memory measured at two probe lengths (a fixed
    part plus a part linear in the tokens); a multiple of 256 within [floor, ceiling]. Pure."""
    (short, low), (long, high) = sorted(peaks.items())[:2]
    per_token = max((high - low) / (long - short), 1.0)
    fixed = low - per_token * short
    fitted = int((usable_bytes - fixed) / per_token) // 256 * 256
    return max(floor, min(ceiling, fitted))


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

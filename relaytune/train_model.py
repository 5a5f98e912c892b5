"""The model a training run trains, in the order it is built: device and compute dtype, the base model loaded for
`train.method` (4-bit NF4 for qlora, the compute dtype for lora, fp32 master weights for full), LoRA, and the host
profile's speed-ups with the checks that they keep the math (Liger's fused cross-entropy, the packing-leak check,
compiled decoder layers). Last, what the epoch's metrics report of the model that really trained: linear layers held
in 4 bits and peak memory.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

from .errors import RelaytuneError
from .host import HostProfile
from .models import BaseModelRef, Quant4bit, bnb_4bit_config
from .params import Params
from .provenance import inference_dtype
from .train_data import Example, collate

log = logging.getLogger(__name__)

# Relative logit change above which packed rows are taken to see each other (rounding stays far below).
PACKING_LEAK_TOLERANCE = 1e-3
# flex_attention's block size: a packed micro-batch shorter than one block (a lone short row, under a small token
# budget) stopped torch 2.11's inductor in flex attention's backward (NoValidChoicesError, one query block), so such
# a micro-batch is padded to one block with a row of its own (train_data.collate).
FLEX_BLOCK_TOKENS = 128


def training_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def training_dtype(host: HostProfile) -> torch.dtype:
    return getattr(torch, inference_dtype(host.dtype))


# What the host profile reads of the card, in one place each (bench/train_throughput.py --emulate replaces them to
# resolve another card's profile, leaving torch's own answers to the kernels that compile for the real card).
def compute_capability(device: str) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if device == "cuda" else None


def card_memory_bytes() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def load_model(base: BaseModelRef, params: Params, host: HostProfile, device: str, dtype: torch.dtype,
               weights_dir: Path | None = None):
    """The base model prepared for params.train.method, with the kernels of the (effective) host profile applied;
    `weights_dir` replaces the base weights (full method)."""
    from transformers import AutoModelForCausalLM

    method = params.train.method
    checkpointing = host.gradient_checkpointing
    kwargs: dict = {"trust_remote_code": params.model.trust_remote_code}
    if host.attn_implementation:
        kwargs["attn_implementation"] = host.attn_implementation
    if method == "qlora" and host.distributed == "fsdp":
        rest_dtype = torch.float32 if host.frozen_weights_fp32 else dtype  # the unquantized rest of the model
        # The 4-bit bytes stored as the rest is (the bitsandbytes and peft FSDP guides: the compute dtype), so that
        # a decoder layer flattens into one FSDP tensor; the model is loaded into CPU memory, as a base that does not
        # fit one GPU in 4 bits must be, and FSDP moves each layer's shard to this rank's GPU as it wraps it.
        kwargs.update(dtype=rest_dtype, quantization_config=qlora_config(params, dtype, storage_dtype=rest_dtype),
                      device_map={"": "cpu"})
    elif method == "qlora":
        kwargs["quantization_config"] = qlora_config(params, dtype)
        # Each rank's 4-bit model on its own GPU (the one its process was bound to), never spread over several.
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else device}
        if not host.frozen_weights_fp32:
            kwargs["dtype"] = dtype  # the unquantized rest of the model
    else:
        # LoRA freezes the base in the compute dtype; a full fine-tune keeps fp32 master weights.
        kwargs["dtype"] = dtype if method == "lora" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(weights_dir or base.path, **kwargs)
    if method != "qlora" and host.distributed != "fsdp":  # FSDP moves each rank's shard, and only it
        model.to(device)
    optimisations = {"liger": apply_liger_kernels(model, host, device)}
    if method == "full":
        if checkpointing:
            set_gradient_checkpointing(model, True)
        model.config.use_cache = False
        return model, optimisations
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora" and host.frozen_weights_fp32:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        set_gradient_checkpointing(model, True)
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = params.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config), optimisations


def qlora_config(params: Params, dtype: torch.dtype, storage_dtype: torch.dtype | None = None):
    return bnb_4bit_config(Quant4bit(params.train.quant_type, params.train.double_quant), dtype, "train.method=qlora",
                           "-S train.method=lora", storage_dtype)


def apply_liger_kernels(model, host: HostProfile, device: str) -> dict:
    """Liger's fused kernels where they can run. Returns what was applied, or why not, for the manifest."""
    if host.liger_kernel is False:
        return {"applied": False, "reason": "off in the host profile"}
    reason = None
    if device != "cuda":
        reason = "no CUDA GPU"
    else:
        try:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        except ImportError as e:
            reason = f"liger-kernel does not import ({e})"
        else:
            if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
                reason = f"liger-kernel has no kernels for model type {model.config.model_type}"
    if reason:
        if host.liger_kernel:
            raise RelaytuneError(f"host profile liger_kernel: true, but {reason}")
        if device == "cuda":
            log.warning("training without Liger kernels: %s", reason)
        return {"applied": False, "reason": reason}
    from transformers.integrations.liger import apply_liger_kernel

    # Compiled layers get their norms, RoPE and SwiGLU fused by the compiler; Liger keeps the fused linear
    # cross-entropy, which no compiler does: the vocabulary logits never exist in full.
    only_loss = {"rope": False, "rms_norm": False, "swiglu": False} if host.compile else {}
    apply_liger_kernel(model, {"fused_linear_cross_entropy": True, **only_loss})
    return {"applied": True, "kernels": "fused linear cross-entropy" if only_loss else "all"}


def packing_leak(model, examples: list[Example], device: str, dtype: torch.dtype) -> float:
    """How much a packed row's logits move when the row packed before it changes: 0 (up to rounding) where the model
    keeps packed rows apart, the size of a real logit change where attention crosses rows."""
    first, second = (e.input_ids[:16] for e in sorted(examples, key=lambda e: -len(e.input_ids))[:2])
    changed = first[1:] + first[:1]
    logits = []
    # Only dropout is switched off: a bitsandbytes 4-bit layer that runs forward in eval mode on a CPU repacks its
    # weight for inference, and backward through it no longer reaches earlier layers.
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    try:
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            for lead in (first, changed):
                batch = collate([Example("a", 0, lead, lead), Example("b", 0, second, second)], 0, packing=True)
                batch.pop("labels")
                out = model(**{k: v.to(device) for k, v in batch.items()}).logits[0, len(lead):].float()
                logits.append(out)
    finally:
        for m in dropouts:
            m.train()
    return ((logits[0] - logits[1]).abs().max() / logits[0].abs().max().clamp_min(1e-6)).item()


def check_packing(model, examples: list[Example], device: str, dtype: torch.dtype, required: bool) -> dict:
    """Whether this model keeps packed rows apart, for the manifest: {"applied", "leak"}. One that lets them attend to
    each other trains with padded micro-batches instead (a warning), or stops the run if the host profile asked for
    packing explicitly (`required`)."""
    leak = packing_leak(model, examples, device, dtype)
    if leak < PACKING_LEAK_TOLERANCE:
        return {"applied": True, "leak": round(leak, 6)}
    name = type(getattr(model, "get_base_model", lambda: model)()).__name__
    why = f"{name} lets packed rows attend to each other (relative logit change {leak:.3g})"
    if required:
        raise RelaytuneError(f"host profile packing: true, but {why}; set packing: false")
    log.warning("training with padded micro-batches: %s", why)
    return {"applied": False, "leak": round(leak, 6)}


def compile_decoder_layers(model) -> dict:
    """torch.compile every decoder layer in place: one graph serves them all, whatever the sequence length."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise RelaytuneError(f"host profile compile: no decoder layers found in {type(model).__name__}; set "
                             "compile: false in host.yaml (or RELAYTUNE_COMPILE=false)")
    for layer in layers:
        layer.compile(dynamic=True)
    return {"applied": True, "layers": len(layers)}


# The share of the card's memory a fitted token budget may fill: the caching allocator's fragmentation, the
# optimizer's first step (Adam's moments appear then) and padded micro-batches need the rest.
FIT_FILL = 0.8
PROBE_TOKENS = (1024, 2048)


def probe_peaks(model, lengths, dtype: torch.dtype, device: str, vocab_size: int, peak_bytes) -> dict[int, int]:
    """Peak memory (bytes, by `peak_bytes(run)`, which resets the counter and runs `run`) of one forward and backward
    of a single row of each length, as a micro-batch of that many tokens costs. Every RNG is forked (training's
    dropout stream stays where it was) and the gradients are cleared afterwards: the run's math is untouched."""
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    peaks = {}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        for n in lengths:
            ids = torch.randint(3, vocab_size, (1, n), device=device)

            def run():
                with autocast:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()

            try:
                peaks[n] = peak_bytes(run)
            except torch.OutOfMemoryError:
                peaks[n] = None  # the caller halves its budget
            finally:
                model.zero_grad(set_to_none=True)
    return peaks


def cuda_peak_bytes(run) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def fit_token_budget(model, dtype: torch.dtype, vocab_size: int, ceiling: int) -> dict | None:
    """host.micro_batch_tokens for this card, with the model's gradient checkpointing as it is now: the peak at two
    probe lengths gives the memory per token (linear, with or without checkpointing), the budget fills FIT_FILL of
    the card's memory, and a probe at the budget confirms it (halved until it fits). What was measured, for the
    manifest; None where the probes themselves do not fit."""
    from .host import fitted_token_budget

    usable = FIT_FILL * card_memory_bytes()
    peaks = probe_peaks(model, PROBE_TOKENS, dtype, "cuda", vocab_size, cuda_peak_bytes)
    if None in peaks.values() or max(peaks.values()) > usable:
        torch.cuda.empty_cache()  # an out-of-memory probe leaves its blocks cached
        return None
    budget = fitted_token_budget(peaks, usable, floor=PROBE_TOKENS[0], ceiling=ceiling)
    while True:
        confirmed = probe_peaks(model, [budget], dtype, "cuda", vocab_size, cuda_peak_bytes)[budget]
        if budget <= PROBE_TOKENS[0] or (confirmed is not None and confirmed <= usable):
            break
        budget = max(PROBE_TOKENS[0], budget // 2)
    torch.cuda.empty_cache()
    gib = 2**30
    return {"applied": True, "budget": budget, "usable_gib": round(usable / gib, 2),
            "probe_peak_gib": {str(n): round(p / gib, 3) for n, p in peaks.items()},
            "peak_at_budget_gib": None if confirmed is None else round(confirmed / gib, 3)}


def set_gradient_checkpointing(model, on: bool) -> None:
    """Switch checkpointing of the decoder layers on or off in place (non-reentrant: it composes with compiled layers
    and with inputs that need no gradient)."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def fit_memory_plan(model, dtype: torch.dtype, vocab_size: int, ceiling: int, needed_without_checkpointing: int,
                    checkpointing: bool | None) -> dict:
    """Gradient checkpointing and the token budget for this card. `checkpointing` is what the host profile asked:
    true or false is kept, and only the budget is fitted. null: checkpointing recomputes every layer's forward in
    backward (a third more compute, and a third dequantisation pass of the NF4 weights), so where the card holds
    `needed_without_checkpointing` tokens per micro-batch without it (the longest row, and the typical step in one
    micro-batch), it goes off; otherwise it goes on and the budget is fitted with it. Neither changes the math."""
    without = None
    if checkpointing is None:
        set_gradient_checkpointing(model, False)
        without = fit_token_budget(model, dtype, vocab_size, ceiling)
        if without is not None and without["budget"] >= needed_without_checkpointing:
            return {**without, "gradient_checkpointing": False, "needed_without_checkpointing": needed_without_checkpointing}
    set_gradient_checkpointing(model, checkpointing is not False)
    fit = fit_token_budget(model, dtype, vocab_size, ceiling)
    if fit is None:
        raise RelaytuneError(f"out of memory at a {max(PROBE_TOKENS)}-token probe micro-batch; set "
                             "micro_batch_tokens in host.yaml (or RELAYTUNE_MICRO_BATCH_TOKENS)")
    plan = {**fit, "gradient_checkpointing": checkpointing is not False}
    if checkpointing is None:
        plan["without_checkpointing"] = without or "the probes did not fit"
        plan["needed_without_checkpointing"] = needed_without_checkpointing
    return plan


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_4bit_layers(model) -> int:
    """Linear layers actually held in 4 bits: what the metrics report, whatever the params asked for."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    return sum(isinstance(m, Linear4bit) for m in model.modules())


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is KiB on Linux

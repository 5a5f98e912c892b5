"""FSDP for training state that does not fit one GPU, in the order a run meets it: which engine the host runs (ddp or
fsdp), the process group that even one FSDP process needs, the decoder layer class it wraps, the model sharded in
place, and the full (unsharded) state dicts that keep the relay folder the same whatever world size wrote it.

PyTorch's FSDP2 (`fully_shard`) is driven directly rather than through accelerate's FSDP plugin. relaytune's loop is
its own (micro-batches, loss normalisation over the whole effective batch, the GradScaler, the relay folder), and
accelerate's FSDP2 path wants `Accelerator.prepare` to own the model, optimizer and gradient accumulation. The direct
route is a mesh, one `fully_shard` per decoder layer and one at the root, as torchtitan and torchtune do.

QLoRA is the exception: FSDP2 turns every parameter into a plain DTensor, and bitsandbytes' `Params4bit` loses the
quant state it dequantises with (bitsandbytes#1945, accelerate#3983). A 4-bit base is sharded by FSDP1
(`FullyShardedDataParallel`) with flat parameters (`use_orig_params=False`) and peft's `fsdp_auto_wrap_policy`, as the
bitsandbytes and peft FSDP-QLoRA guides do: bitsandbytes restores the quant state from its module, and each LoRA
layer is a unit of its own, since a flat parameter holds one dtype and one requires_grad.
"""

from __future__ import annotations

import contextlib
import socket

import torch

from .errors import RelaytuneError

# AdamW's training state of a full fine-tune, per parameter: fp32 master weight, fp32 gradient, two fp32 moments.
FULL_TRAINING_BYTES_PER_PARAMETER = 16


def resolve_distributed(asked: str | None, method: str, parameter_count: int, card_bytes: int | None,
                        fill: float) -> str:
    """The engine a run uses. null: DDP for LoRA and QLoRA (the frozen base is small); for `full`, FSDP where the
    training state alone would fill more than `fill` of the card (a CPU host, card_bytes None, runs DDP). Pure."""
    if asked is not None:
        return asked
    if method == "full" and card_bytes and parameter_count * FULL_TRAINING_BYTES_PER_PARAMETER > fill * card_bytes:
        return "fsdp"
    return "ddp"


def count_parameters(model_path: str, trust_remote_code: bool) -> int:
    """Parameters of a model, from its config alone (built on the meta device: no weights are read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def check_fsdp_host(method: str, device: str, cpu_offload: bool) -> None:
    """One line for each host or method FSDP cannot run on here."""
    if method == "qlora" and cpu_offload:
        raise RelaytuneError("host profile fsdp_cpu_offload: true with train.method=qlora is not supported: "
                             "offloading bitsandbytes' 4-bit weights with their quant state is not built; set "
                             "fsdp_cpu_offload: false")
    if not torch.distributed.is_available():
        raise RelaytuneError("host profile distributed: fsdp, but this torch build has no torch.distributed; "
                             "set distributed: ddp")
    if device == "cuda" and not torch.distributed.is_nccl_available():
        raise RelaytuneError("host profile distributed: fsdp, but this torch build has no NCCL backend for its GPUs; "
                             "set distributed: ddp")
    if cpu_offload and device != "cuda":
        raise RelaytuneError("host profile fsdp_cpu_offload: true, but this host has no CUDA GPU to offload from; "
                             "set fsdp_cpu_offload: false")


def join_single_process_group(device: str) -> None:
    """FSDP needs a process group even on one process (world size 1): join a local one when no launcher did."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers FSDP wraps one unit each: transformers names the classes that must stay whole on one
    device in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise RelaytuneError(f"host profile distributed: fsdp, but no decoder layer class to wrap was found in "
                             f"{type(base).__name__} (its _no_split_modules: {sorted(names) or 'none'}); "
                             "set distributed: ddp")
    return layers


def shard_model(model, device: str, cpu_offload: bool, method: str) -> tuple[torch.nn.Module, dict]:
    """Shard parameters, gradients and (through them) optimizer state over every process: one FSDP unit per decoder
    layer, the rest (embeddings, final norm, head) in the root's. Returns the model forward and backward run through
    (FSDP2 shards in place; FSDP1 wraps) and what was applied, for the manifest."""
    if method == "qlora":
        return shard_4bit_model(model, device)
    return shard_in_place(model, device, cpu_offload)


def shard_in_place(model, device: str, cpu_offload: bool) -> tuple[torch.nn.Module, dict]:
    """FSDP2. Parameters are gathered in the dtype they are stored in (fp32 master weights for `full`), and the
    forward runs under the run's autocast as it does in one process: a bf16 all-gather would also run norms and
    embeddings in bf16, which one process does not, so the host knob would change the math. Gradients are reduced in
    fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    layers = decoder_layers(model)
    wrap_unit = type(layers[0]).__name__  # fully_shard renames the class (FSDP<name>)
    world_size = torch.distributed.get_world_size()
    mesh = init_device_mesh(device, (world_size,))
    options = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.float32),
               "offload_policy": CPUOffloadPolicy(pin_memory=True) if cpu_offload else OffloadPolicy()}
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model, {"applied": True, "engine": "FSDP2 (torch.distributed.fsdp.fully_shard)", "world_size": world_size,
                   "wrap_unit": wrap_unit, "units": len(layers) + 1, "cpu_offload": cpu_offload,
                   "param_dtype": "as stored", "reduce_dtype": "float32"}


def shard_4bit_model(model, device: str) -> tuple[torch.nn.Module, dict]:
    """FSDP1 for a QLoRA model loaded into CPU memory: each unit is moved to this rank's GPU and sharded as it is
    wrapped, so no GPU ever holds the whole base. No mixed-precision policy: the 4-bit bytes and the frozen rest are
    gathered as stored, the fp32 LoRA gradients are reduced in fp32."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    layers = decoder_layers(model)
    storage = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                      if type(p).__name__ == "Params4bit"})
    on = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                                       device_id=on, limit_all_gathers=True)
    units = sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules())
    return wrapped, {"applied": True, "engine": "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel)",
                     "world_size": torch.distributed.get_world_size(), "wrap_unit": type(layers[0]).__name__,
                     "units": units, "cpu_offload": False, "param_dtype": "as stored", "reduce_dtype": "float32",
                     "quant_storage": storage}


def clip_gradients(model, parameters: list[torch.Tensor], max_norm: float) -> None:
    """The norm over the whole model's gradients: FSDP1's flat shards need its own clip (FSDP2's DTensors, DDP's and
    one process's tensors take torch's)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        model.clip_grad_norm_(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)


# ---------------------------------------------------------------- full state dicts for the relay folder

def full_state_dicts(model, optimizer, adapter: list[str] | None, device: str) -> tuple[dict, dict]:
    """The model's and the optimizer's state gathered whole (every rank must call it; on a GPU host onto rank 0's
    CPU, the others get empty dicts). The optimizer's comes back keyed by parameter index, as a one-process
    `optimizer.state_dict()` is, so the relay folder has one form whatever wrote it. `adapter`: gather only these
    trained parameters (a frozen head tied to the frozen embeddings would come along otherwise)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    # On a CPU host FSDP1's offload to the CPU fails (torch 2.13: "storage of size 0" while unsharding): no offload.
    options = StateDictOptions(full_state_dict=True, cpu_offload=device == "cuda",
                               ignore_frozen_params=adapter is not None)
    weights = retie(get_model_state_dict(model, options=options), model)
    if adapter is not None:
        weights = {name: weights[name] for name in adapter if name in weights}
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    return weights, (index_keyed(by_name) if by_name else {})


@contextlib.contextmanager
def unwrapped(model):
    """The model with FSDP1's units put back as the plain modules they wrap, for the duration (rank 0, to save):
    peft names adapter weights by module path and strips only a leading `_fsdp_wrapped_module.`, so an adapter saved
    through nested units would come out empty. FSDP2 wraps nothing; its model is returned as is."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, FullyShardedDataParallel)]
    for parent, name, child in units:
        setattr(parent, name, child.module)
    try:
        yield model.module if isinstance(model, FullyShardedDataParallel) else model
    finally:
        for parent, name, child in reversed(units):
            setattr(parent, name, child)


def retie(weights: dict, model) -> dict:
    """Names that share one parameter in the model (tied embeddings and head) made to share one tensor again: the
    gathered copies are separate, and transformers drops a tied name from the saved file only where the tensors
    alias, as they do in one process."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for first, *tied in names_of.values():
        for name in tied:
            if first in weights and name in weights:
                weights[name] = weights[first]
    return weights


def index_keyed(by_name: dict) -> dict:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's form) keyed by the
    parameter's index in the optimizer's groups instead (torch.optim's own form). Pure."""
    order = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                             for group in by_name["param_groups"]]}


def name_keyed(by_index: dict, names: list[str]) -> dict:
    """The inverse of `index_keyed`, for parameters `names` in the optimizer's order. Pure."""
    if len(names) != sum(len(g["params"]) for g in by_index["param_groups"]):
        raise RelaytuneError(f"optimizer state holds {sum(len(g['params']) for g in by_index['param_groups'])} "
                             f"parameters, this model trains {len(names)}")
    return {"state": {names[i]: value for i, value in by_index["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in by_index["param_groups"]]}


def trainable_names(model) -> list[str]:
    """Names of the trained parameters in the order the optimizer holds them, taken before sharding (FSDP1 renames
    them into flat parameters; FSDP2 keeps them)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load_full_optimizer_state(model, optimizer, by_index: dict, names: list[str]) -> None:
    """Every rank loads the whole saved state and keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, name_keyed(by_index, names),
                             options=StateDictOptions(full_state_dict=True))


def optimizer_state_casts(by_index: dict, params: list[torch.Tensor]) -> dict[str, int]:
    """Saved optimizer moments whose dtype differs from the parameter they now serve ("float32 -> bfloat16": count).
    torch.optim casts them on load without a word; the manifest records it instead. Pure."""
    casts: dict[str, int] = {}
    for i, state in by_index.get("state", {}).items():
        if i >= len(params):  # a state for another model: loading it names the mismatch
            continue
        for value in state.values():
            if torch.is_tensor(value) and value.is_floating_point() and value.dim() and value.dtype != params[i].dtype:
                key = f"{str(value.dtype).removeprefix('torch.')} -> {str(params[i].dtype).removeprefix('torch.')}"
                casts[key] = casts.get(key, 0) + 1
    return casts

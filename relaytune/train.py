"""Fine-tuning one epoch per stage, relaying only what the next epoch needs.

A recipe in three parts, read top to bottom: `TrainingRun.setup` (model, optimizer, scheduler and the state handed
over by the parent epoch or a mid-epoch checkpoint), `TrainingRun.train_epoch` (the loop), `TrainingRun.save`
(adapter or weights, optimizer, scheduler, RNG, trainer state and a manifest, written atomically as one folder).

Under DDP (several processes, relaytune/distributed.py) every rank holds the whole model and the same data order;
each optimizer step's rows are dealt out across the ranks, gradients are averaged by DDP, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import RelaytuneError
from .host import HostProfile, effective_profile
from .io import atomic_write_json, read_json, read_jsonl_lines
from .models import BaseModelRef, resolve_base_model, sha256_file
from .params import PARAMS_HASH_KEYS, Params, select_params
from .provenance import accelerator, inference_dtype, library_versions

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
SCALER = "scaler.pt"
IGNORE_INDEX = -100
# Relative logit change above which packed rows are taken to see each other (rounding stays far below).
PACKING_LEAK_TOLERANCE = 1e-3


# ---------------------------------------------------------------- data

@dataclass(frozen=True)
class Example:
    id: str
    line: int
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere but the assistant's answer


def load_training_rows(path: str | Path) -> list[tuple[int, dict]]:
    """The audit stage's output: every line must be a chat row with a user and an assistant message."""
    rows = []
    for lineno, obj, problem in read_jsonl_lines(path):
        if problem is None:
            messages = obj.get("messages")
            if not isinstance(obj.get("id"), str):
                problem = "missing field 'id'"
            elif not (isinstance(messages, list) and len(messages) >= 2 and all(isinstance(m, dict) for m in messages)
                      and messages[-1].get("role") == "assistant" and str(messages[-1].get("content", "")).strip()):
                problem = "messages must end with a non-empty assistant answer"
        if problem:
            raise RelaytuneError(f"{path}:{lineno}: {problem}")
        rows.append((lineno, obj))
    if not rows:
        raise RelaytuneError(f"{path}: no training rows (did audit.drop_flagged drop every row?)")
    return rows


def tokenize_rows(rows: list[tuple[int, dict]], tokenizer, max_seq_len: int, overflow: str, source: str
                  ) -> tuple[list[Example], int]:
    """Chat-template each row; only the final assistant turn is learned. Returns examples and how many were cut."""
    from datasets import Dataset

    def encode(row: dict) -> dict:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True)
        prompt_ids, full_ids = list(prompt["input_ids"]), list(full["input_ids"])
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise RelaytuneError(f"{source}:{row['line']}: the chat template does not render the prompt as a prefix "
                                 "of the conversation, so the answer tokens cannot be located")
        labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
        return {"input_ids": full_ids, "labels": labels, "n_tokens": len(full_ids)}

    table = Dataset.from_list([{"id": r["id"], "line": line, "messages": r["messages"]} for line, r in rows])
    encoded = table.map(encode, remove_columns=["messages"], keep_in_memory=True)
    examples, truncated = [], 0
    for item in encoded:
        ids, labels = item["input_ids"], item["labels"]
        if len(ids) > max_seq_len:
            if overflow == "fail":
                raise RelaytuneError(f"{source}:{item['line']}: row {item['id']} has {len(ids)} tokens, more than "
                                     f"train.max_seq_len={max_seq_len} (train.overflow: fail)")
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            truncated += 1
        if all(t == IGNORE_INDEX for t in labels[1:]):
            raise RelaytuneError(f"{source}:{item['line']}: row {item['id']} has no answer tokens within "
                                 f"train.max_seq_len={max_seq_len}")
        examples.append(Example(item["id"], item["line"], ids, labels))
    return examples, truncated


def epoch_batches(n_rows: int, effective_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's data order: a permutation seeded by (seed, epoch), the same on every host, cut into steps."""
    order = np.random.default_rng([seed, epoch]).permutation(n_rows).tolist()
    return [order[i:i + effective_batch_size] for i in range(0, n_rows, effective_batch_size)]


def rank_share(step_rows: list, rank: int, num_processes: int) -> list:
    """The rows of one optimizer step that `rank` computes: dealt round-robin, so every rank gets a share of the step
    within one row of the others'."""
    return step_rows[rank::num_processes]


def rank_disagreement(starts: list[dict]) -> str | None:
    """The first rank whose starting point (lineage, rows, resume step) differs from rank 0's, in words."""
    for rank, theirs in enumerate(starts[1:], start=1):
        different = [k for k in starts[0] if theirs[k] != starts[0][k]]
        if different:
            return (f"rank {rank} starts from another {', '.join(different)} than rank 0: every process must read "
                    "the same training data, parent epoch and checkpoint")
    return None


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (one process is unchanged); other ranks draw their own dropout masks."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def collate(examples: list[Example], pad_token_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Pad per micro-batch (labels with IGNORE_INDEX), or (packing) concatenate rows into one padding-free sequence
    whose position ids restart at every row, so that attention stays inside each row."""
    from torch.nn.utils.rnn import pad_sequence
    from transformers import DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_tensors="pt")(
            [{"input_ids": e.input_ids, "labels": e.labels} for e in examples])

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=value)

    return {"input_ids": pad([e.input_ids for e in examples], pad_token_id),
            "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
            "labels": pad([e.labels for e in examples], IGNORE_INDEX)}


# ---------------------------------------------------------------- hashes and manifests

def params_hash(params: Params) -> str:
    blob = json.dumps(select_params(params, PARAMS_HASH_KEYS), sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def data_hash(path: str | Path) -> str:
    return "sha256:" + sha256_file(Path(path))


@dataclass(frozen=True)
class Lineage:
    """What an epoch folder was made from; loading it anywhere else is refused."""

    base_model_hash: str
    params_hash: str
    data_hash: str


# ---------------------------------------------------------------- state

@dataclass
class TrainerState:
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps completed over the whole chain
    step_in_epoch: int = 0  # optimizer steps completed in the epoch under way (mid-epoch checkpoints)
    steps_per_epoch: int = 0
    data_order_seed: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step: step, epoch, loss, lr, ...


@dataclass
class EpochReport:
    epoch: int
    steps: int
    tokens: int  # non-pad tokens seen (prompt and answer)
    seconds: float
    loss_first: float
    loss_last: float
    loss_mean: float
    resumed_from_step: int  # step_in_epoch restored from a mid-epoch checkpoint (0: none)
    peak_memory_gib: float  # the largest of any rank's

    @property
    def tokens_per_second(self) -> float:
        return round(self.tokens / self.seconds, 1) if self.seconds else 0.0


def training_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def training_dtype(host: HostProfile) -> torch.dtype:
    return getattr(torch, inference_dtype(host.dtype))


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is KiB on Linux


def rng_state(device: str) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor], device: str) -> None:
    torch.set_rng_state(state["torch"])
    if device == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def rank_rng_state(saved: dict, rank: int) -> dict[str, torch.Tensor] | None:
    """Rank `rank`'s generator state from an rng.pt (rank 0's at the top level, the others' under "other_ranks");
    None where the run that saved it had fewer processes."""
    if rank == 0:
        return saved
    others = saved.get("other_ranks", [])
    return others[rank - 1] if rank <= len(others) else None


def load_tensor_file(path: Path, device: str):
    # weights_only: nothing is unpickled from a file that may come from another host.
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise RelaytuneError(f"{path}: cannot be loaded as plain tensors ({type(e).__name__})") from None


def verify_epoch_folder(directory: Path) -> dict:
    """The folder's manifest, after checking every file against the hashes it lists."""
    if not (directory / MANIFEST).exists():
        raise RelaytuneError(f"{directory}: missing parent epoch (no {MANIFEST}); run its stage or `dvc pull` it")
    manifest = read_json(directory / MANIFEST)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.exists():
            raise RelaytuneError(f"{path}: missing (listed in {directory / MANIFEST})")
        actual = "sha256:" + sha256_file(path)
        if actual != expected:
            raise RelaytuneError(f"{path}: corrupted (hash mismatch: manifest {expected[:19]}, file {actual[:19]})")
    return manifest


def check_lineage(directory: Path, manifest: dict, expected: Lineage) -> None:
    made = manifest["lineage"]
    for key, what in [("base_model_hash", "base model"), ("params_hash", "math-defining params")]:
        if made[key] != getattr(expected, key):
            raise RelaytuneError(f"{directory}: made with another {what} ({made[key][:19]}) than this run's "
                                 f"({getattr(expected, key)[:19]}); continue it with the params and model it was "
                                 "made with, or start the chain again")


def usable_checkpoint(directory: Path, lineage: Lineage, epoch: int) -> bool:
    """A mid-epoch checkpoint of this epoch made from the same base, params and data; anything else is stale."""
    if not (directory / MANIFEST).exists():
        return False
    try:
        manifest = verify_epoch_folder(directory)
    except RelaytuneError as e:
        log.warning("discarding checkpoint %s: %s", directory, e)
        return False
    made = manifest["lineage"]
    stale = [k for k, v in asdict(lineage).items() if made.get(k) != v]
    if manifest.get("epoch") != epoch - 1 or stale:
        why = ", ".join(f"{k} {made.get(k, '?')[:19]} -> {getattr(lineage, k)[:19]}" for k in stale) or "another epoch"
        log.warning("discarding stale checkpoint %s (%s)", directory, why)
        return False
    return True


# ---------------------------------------------------------------- model

def micro_batches(lengths: list[int], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Consecutive rows grouped into micro-batches of at most `max_rows` rows and `max_tokens` tokens (a longer row
    goes alone): indices into `lengths`."""
    groups: list[list[int]] = []
    tokens = 0
    for i, n in enumerate(lengths):
        if not groups or len(groups[-1]) == max_rows or (max_tokens is not None and tokens + n > max_tokens):
            groups.append([])
            tokens = 0
        groups[-1].append(i)
        tokens += n
    return groups


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
    if method == "qlora":
        kwargs["quantization_config"] = qlora_config(params, dtype)
        # Each rank's 4-bit model on its own GPU (the one its process was bound to), never spread over several.
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else device}
        if not host.frozen_weights_fp32:
            kwargs["dtype"] = dtype  # the unquantized rest of the model
    else:
        # LoRA freezes the base in the compute dtype; a full fine-tune keeps fp32 master weights.
        kwargs["dtype"] = dtype if method == "lora" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(weights_dir or base.path, **kwargs)
    if method != "qlora":
        model.to(device)
    optimisations = {"liger": apply_liger_kernels(model, host, device)}
    if method == "full":
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model, optimisations
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora" and host.frozen_weights_fp32:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = params.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config), optimisations


def qlora_config(params: Params, dtype: torch.dtype):
    """bitsandbytes 4-bit config; a host where it cannot run stops here, never silently becoming LoRA."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise RelaytuneError(f"train.method=qlora needs bitsandbytes, which does not import on this host ({e}); "
                             "install it or run with -S train.method=lora") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=params.train.quant_type,
                              bnb_4bit_use_double_quant=params.train.double_quant, bnb_4bit_compute_dtype=dtype)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------- the recipe

StepCallback = Callable[[dict], None]


class TrainingRun:
    def __init__(self, params: Params, host: HostProfile, base: BaseModelRef, examples: list[Example],
                 lineage: Lineage, pad_token_id: int):
        from accelerate import PartialState

        self.params = params
        self.base = base
        self.examples = examples
        self.lineage = lineage
        self.pad_token_id = pad_token_id
        self.device = training_device()
        # Joins the process group when a launcher started this process (NCCL on GPUs, gloo on CPUs) and binds the
        # process to its GPU, so that "cuda" below is this rank's own device.
        self.processes = PartialState(cpu=self.device == "cpu")
        self.rank, self.num_processes = self.processes.process_index, self.processes.num_processes
        self.is_main = self.processes.is_main_process
        self.dtype = training_dtype(host)
        self.requested_host = host
        capability = torch.cuda.get_device_capability() if self.device == "cuda" else None
        self.host = effective_profile(host, self.device, str(self.dtype).removeprefix("torch."), capability,
                                      self.num_processes)
        t = params.train
        share = math.ceil(t.effective_batch_size / self.num_processes)  # rows of a step that one process computes
        self.micro_batch_size = min(host.micro_batch_size or share, share)
        self.steps_per_epoch = math.ceil(len(examples) / t.effective_batch_size)
        # handoff=adapter: every epoch is a fresh run from the previous adapter, with its own schedule.
        self.schedule_steps = self.steps_per_epoch * (t.epochs if t.handoff == "state" else 1)
        self.state = TrainerState(steps_per_epoch=self.steps_per_epoch, data_order_seed=params.seed)
        self.parent: dict | None = None  # manifest of the epoch this run continues
        self.optimisations: dict = {}  # what setup applied of the host profile's speed-ups, or why not

    # -- setup

    def setup(self, parent_dir: Path | None = None, checkpoint_dir: Path | None = None) -> None:
        """Build everything, then restore the parent epoch's state or a mid-epoch checkpoint (which wins)."""
        source = checkpoint_dir or parent_dir
        manifest = None
        if source is not None:
            manifest = verify_epoch_folder(source)
            check_lineage(source, manifest, self.lineage)
        if parent_dir is not None:
            self.parent = verify_epoch_folder(parent_dir) if source != parent_dir else manifest
        torch.manual_seed(self.params.seed)  # the same LoRA initialisation on every rank
        full_weights = source if (source is not None and self.params.train.method == "full") else None
        self.model, self.optimisations = load_model(self.base, self.params, self.host, self.device, self.dtype,
                                                    full_weights)
        self.model.train()  # from_pretrained returns eval mode, where checkpointing and dropout do nothing
        if self.rank:  # rank 0's stream runs on from the initialisation, as in one process
            torch.manual_seed(rank_seed(self.params.seed, self.rank))
        if self.host.packing:
            self._check_packing()
        if self.host.compile:
            self.optimisations["compile"] = compile_decoder_layers(self.model)
        t = self.params.train
        self.optimizer = torch.optim.AdamW(trainable_parameters(self.model), lr=t.learning_rate,
                                           weight_decay=t.weight_decay)
        self.scheduler = self._new_scheduler()
        use_scaler = self.device == "cuda" and self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        if source is not None:
            self._restore(source, exact=checkpoint_dir is not None or t.handoff == "state")
        self._check_ranks_agree()
        self.train_model = self._wrap_for_ddp()

    def _restore(self, source: Path, exact: bool) -> None:
        """The adapter and trainer state of `source`; with `exact`, also optimizer, scheduler, scaler and RNG."""
        if self.params.train.method != "full":
            self._load_adapter(source)
        self.state = TrainerState(**read_json(source / TRAINER_STATE))
        if exact:
            self.optimizer.load_state_dict(load_tensor_file(source / OPTIMIZER, self.device))
            self.scheduler.load_state_dict(load_tensor_file(source / SCHEDULER, "cpu"))
            if self.scaler is not None and (source / SCALER).exists():
                self.scaler.load_state_dict(load_tensor_file(source / SCALER, "cpu"))
            saved_rng = rank_rng_state(load_tensor_file(source / RNG, "cpu"), self.rank)
            if saved_rng is None:
                log.info("rank %d: %s was saved by fewer processes; this rank's dropout stream starts afresh",
                         self.rank, source / RNG)
                torch.manual_seed(rank_seed(self.params.seed + self.state.global_step, self.rank))
            else:
                restore_rng_state(saved_rng, self.device)

    def _wrap_for_ddp(self):
        """The model that forward and backward run through: DDP's wrapper (gradients averaged over the ranks at
        each step's last backward) under a launcher, the model itself otherwise."""
        if not torch.distributed.is_initialized():
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if self.device == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _check_ranks_agree(self) -> None:
        """Every rank must start from the same lineage and resume state; hosts that read different files stop here."""
        from accelerate.utils import gather_object

        mine = {"lineage": asdict(self.lineage), "rows": len(self.examples), "epoch": self.state.epoch,
                "global_step": self.state.global_step, "step_in_epoch": self.state.step_in_epoch}
        problem = rank_disagreement(gather_object([mine]))
        if problem:
            raise RelaytuneError(problem)

    def _check_packing(self) -> None:
        leak = packing_leak(self.model, self.examples, self.device, self.dtype)
        self.optimisations["packing"] = {"applied": leak < PACKING_LEAK_TOLERANCE, "leak": round(leak, 6)}
        if leak < PACKING_LEAK_TOLERANCE:
            return
        model = getattr(self.model, "get_base_model", lambda: self.model)()
        why = (f"{type(model).__name__} lets packed rows attend to each other (relative logit "
               f"change {leak:.3g})")
        if self.requested_host.packing:
            raise RelaytuneError(f"host profile packing: true, but {why}; set packing: false")
        log.warning("training with padded micro-batches: %s", why)
        self.host = self.host.model_copy(update={"packing": False})

    def _new_scheduler(self):
        from transformers import get_scheduler

        t = self.params.train
        return get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=round(t.warmup_ratio * self.schedule_steps),
                             num_training_steps=self.schedule_steps)

    def _load_adapter(self, directory: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(directory / "adapter_model.safetensors", device=self.device)
        result = set_peft_model_state_dict(self.model, weights)
        if result.unexpected_keys:
            raise RelaytuneError(f"{directory}: adapter does not fit this model (e.g. {result.unexpected_keys[0]})")

    # -- train

    def train_epoch(self, epoch: int, on_step: StepCallback | None = None, checkpoint_every: int | None = None,
                    checkpoint_dir: Path | None = None) -> EpochReport:
        from tqdm.auto import tqdm

        t = self.params.train
        if self.state.epoch != epoch - 1:
            raise RelaytuneError(f"epoch {epoch} needs epoch {epoch - 1} as its parent, got epoch {self.state.epoch}")
        if t.handoff == "adapter" and self.state.step_in_epoch == 0:
            # A fresh run per epoch: new optimizer moments, new schedule, new RNG stream.
            self.optimizer = torch.optim.AdamW(trainable_parameters(self.model), lr=t.learning_rate,
                                               weight_decay=t.weight_decay)
            self.scheduler = self._new_scheduler()
            torch.manual_seed(rank_seed(self.params.seed * 1000 + epoch, self.rank))
        batches = epoch_batches(len(self.examples), t.effective_batch_size, self.params.seed, epoch)
        resumed_from = self.state.step_in_epoch
        tokens = 0
        started = time.perf_counter()
        bar = tqdm(total=len(batches), initial=resumed_from, desc=f"epoch {epoch}", unit="step",
                   disable=not self.is_main)
        for step_in_epoch in range(resumed_from, len(batches)):
            step_started = time.perf_counter()
            loss, step_tokens = self.optimizer_step([self.examples[i] for i in batches[step_in_epoch]])
            tokens += step_tokens
            self.state.global_step += 1
            self.state.step_in_epoch = step_in_epoch + 1
            record = {"step": self.state.global_step, "epoch": epoch, "loss": round(loss, 6),
                      "lr": self.scheduler.get_last_lr()[0], "tokens": step_tokens,
                      "tokens_per_second": round(step_tokens / (time.perf_counter() - step_started), 1)}
            self.state.history.append(record)
            if on_step:
                on_step(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            last = self.state.step_in_epoch == len(batches)
            if checkpoint_every and checkpoint_dir and not last and self.state.step_in_epoch % checkpoint_every == 0:
                self.save(checkpoint_dir, {"kind": "mid-epoch checkpoint"})
        bar.close()
        self.state.epoch = epoch
        self.state.step_in_epoch = 0
        this_epoch = [h["loss"] for h in self.state.history if h["epoch"] == epoch]
        return EpochReport(epoch, len(batches) - resumed_from, tokens, time.perf_counter() - started,
                           this_epoch[0], this_epoch[-1], float(np.mean(this_epoch)), resumed_from,
                           self.peak_memory_gib())

    def optimizer_step(self, rows: list[Example]) -> tuple[float, int]:
        """One optimizer step over the effective batch (all ranks' rows), in micro-batches; the loss is the mean over
        every answer token of the whole batch, so neither the micro-batch size nor the number of processes changes
        anything but memory and speed. Returns the whole batch's loss and token count."""
        n_answer_tokens = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in rows)
        own = rank_share(rows, self.rank, self.num_processes)
        # DDP averages gradients over the ranks, and each rank's loss is already a share of the whole batch's sum.
        weight = float(self.num_processes)
        if not own:  # fewer rows than processes: this rank still joins the gradient all-reduce, with zero weight
            own, weight = rows[:1], 0.0
        groups = micro_batches([len(e.input_ids) for e in own], self.micro_batch_size, self.host.micro_batch_tokens)
        total_loss = 0.0
        tokens = 0
        autocast = torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32)
        try:
            for index, group in enumerate(groups):
                micro = [own[i] for i in group]
                batch = {k: v.to(self.device) for k, v in
                         collate(micro, self.pad_token_id, self.host.packing).items()}
                with self._gradient_sync(index == len(groups) - 1):
                    with autocast:
                        loss = self.train_model(**batch, num_items_in_batch=n_answer_tokens).loss
                    (self.scaler.scale(loss * weight) if self.scaler else loss * weight).backward()
                if weight:
                    total_loss += loss.item()
                    tokens += sum(len(e.input_ids) for e in micro)
        except torch.OutOfMemoryError:
            raise RelaytuneError(
                f"out of memory at step {self.state.global_step + 1} on {accelerator()['name']} (micro-batch "
                f"{self.micro_batch_size} rows of up to {max(len(e.input_ids) for e in rows)} tokens, method "
                f"{self.params.train.method}): lower micro_batch_size in host.yaml (or RELAYTUNE_MICRO_BATCH_SIZE), "
                "turn on gradient_checkpointing, or lower train.max_seq_len") from None
        if self.num_processes > 1:
            from accelerate.utils import reduce

            total_loss, tokens = reduce(torch.tensor([total_loss, tokens], dtype=torch.float64,
                                                     device=self.processes.device), reduction="sum").tolist()
            tokens = int(tokens)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.params.train.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, tokens

    def _gradient_sync(self, sync: bool):
        """DDP averages gradients at every backward outside no_sync(): once per step, at its last micro-batch."""
        if sync or not hasattr(self.train_model, "no_sync"):
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def peak_memory_gib(self) -> float:
        """The largest peak of any rank (every rank must call it)."""
        from accelerate.utils import gather_object

        return max(gather_object([peak_memory_gib(self.device)]))

    def finish(self) -> None:
        """Wait for every rank (rank 0 may still be writing), then leave the process group."""
        if torch.distributed.is_initialized():
            self.processes.wait_for_everyone()
            torch.distributed.destroy_process_group()

    # -- save_checkpoint

    def save(self, directory: Path, manifest_extra: dict | None = None) -> dict | None:
        """Write the whole resumable state to a temp folder, then swap it in: a kill never leaves half a folder.
        Every rank calls it (each hands over its RNG state); rank 0 alone writes, and returns the manifest."""
        from accelerate.utils import gather_object

        rng_states = gather_object([rng_state(self.device)])
        peak_memory = self.peak_memory_gib()
        if not self.is_main:
            return None
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_folders(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        tmp.chmod(0o755)
        try:
            if self.params.train.method == "full":
                self.model.save_pretrained(tmp, safe_serialization=True)
            else:
                self.model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER)
            torch.save(self.scheduler.state_dict(), tmp / SCHEDULER)
            torch.save({**rng_states[0], "other_ranks": rng_states[1:]}, tmp / RNG)
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), tmp / SCALER)
            atomic_write_json(tmp / TRAINER_STATE, asdict(self.state))
            manifest = self.manifest(tmp, peak_memory, manifest_extra or {})
            atomic_write_json(tmp / MANIFEST, manifest)
            replace_folder(tmp, directory)
            return manifest
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def manifest(self, folder: Path, peak_memory: float, extra: dict) -> dict:
        files = {p.name: "sha256:" + sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
        return {
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "method": self.params.train.method,
            "handoff": self.params.train.handoff,
            "lineage": asdict(self.lineage),
            "math_params": select_params(self.params, PARAMS_HASH_KEYS),
            "parent": None if self.parent is None else {
                "epoch": self.parent["epoch"], "host": self.parent["host"]["hostname"],
                "accelerator": self.parent["host"]["accelerator"]["name"], "dtype": self.parent["host"]["dtype"],
                "manifest_sha256": hashlib.sha256(json.dumps(self.parent, sort_keys=True).encode()).hexdigest()},
            "host": {
                "hostname": socket.gethostname(),
                "accelerator": accelerator(),
                "dtype": str(self.dtype).removeprefix("torch."),
                "profile": self.requested_host.model_dump(),
                "effective_profile": self.host.model_dump(),
                "gradient_checkpointing": self.host.gradient_checkpointing,
                "optimisations": self.optimisations,
                "num_processes": self.num_processes,
                "distributed_backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
                "micro_batch_size": self.micro_batch_size,  # rows per forward, in each process
                "gradient_accumulation_steps": math.ceil(self.params.train.effective_batch_size
                                                         / (self.micro_batch_size * self.num_processes)),
                "peak_memory_gib": peak_memory,
                "peak_memory_kind": ("cuda max allocated" if self.device == "cuda" else "process max RSS")
                                    + (", the largest of any process" if self.num_processes > 1 else ""),
            },
            "libraries": library_versions(),
            "files": files,
            **extra,
        }


def remove_stale_temp_folders(target: Path) -> None:
    """Temp folders of `target` left by a process killed outright (SIGKILL leaves no chance to clean up); one stage
    writes one target at a time, so none of them is in use."""
    for stale in target.parent.glob(f".{target.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def replace_folder(new: Path, target: Path) -> None:
    """Swap `new` in for `target` with renames only."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def folder_size_mb(directory: Path, names: list[str] | None = None) -> float:
    files = [p for p in directory.iterdir() if p.is_file() and (names is None or p.name in names)]
    return round(sum(p.stat().st_size for p in files) / 2**20, 3)


def load_tokenizer(base: BaseModelRef, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise RelaytuneError(f"{base.path}: tokenizer has no chat template (model.base must be an instruct model)")
    return tokenizer


def count_4bit_layers(model) -> int:
    """Linear layers actually held in 4 bits: what the metrics report, whatever the params asked for."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    return sum(isinstance(m, Linear4bit) for m in model.modules())


CHECKPOINT_README = ("Mid-epoch checkpoints of a train_epoch stage (train.checkpoint_every_steps) live here while the "
                     "epoch runs; a finished epoch leaves only this file, which git tracks, so that the folder (a DVC "
                     "persist output) looks the same on every clone.\n")


def reset_checkpoint_folder(directory: Path) -> None:
    """Empty a finished epoch's checkpoint folder down to its README."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / "README.txt").write_text(CHECKPOINT_README)


def epoch_metrics(run: TrainingRun, report: EpochReport, epoch_dir: Path, truncated: int) -> dict:
    model_files = [n for n in os.listdir(epoch_dir) if n.endswith(".safetensors")]
    return {
        "epoch": report.epoch,
        "method": run.params.train.method,
        "linear_layers_4bit": count_4bit_layers(run.model),
        "handoff": run.params.train.handoff,
        "rows": len(run.examples),
        "rows_truncated": truncated,
        "steps": report.steps,
        "global_step": run.state.global_step,
        "resumed_from_step": report.resumed_from_step,
        "loss_first": round(report.loss_first, 6),
        "loss_last": round(report.loss_last, 6),
        "loss_mean": round(report.loss_mean, 6),
        "lr_last": run.scheduler.get_last_lr()[0],
        "tokens": report.tokens,
        "seconds": round(report.seconds, 2),
        "tokens_per_second": report.tokens_per_second,
        "peak_memory_gib": report.peak_memory_gib,
        "device": accelerator()["name"],
        "dtype": str(run.dtype).removeprefix("torch."),
        "micro_batch_size": run.micro_batch_size,
        "num_processes": run.num_processes,
        "weights_mb": folder_size_mb(epoch_dir, model_files),
        "state_mb": folder_size_mb(epoch_dir),
    }


def prepare_run(params: Params, host: HostProfile, data_path: str | Path) -> tuple[TrainingRun, int]:
    """Resolve the base model, tokenize the training file, and return the run (not set up yet) and the number of
    truncated rows."""
    t = params.train
    base = resolve_base_model(params.model)
    tokenizer = load_tokenizer(base, params.model.trust_remote_code)
    examples, truncated = tokenize_rows(load_training_rows(data_path), tokenizer, t.max_seq_len, t.overflow,
                                        str(data_path))
    lineage = Lineage(base.content_hash, params_hash(params), data_hash(data_path))
    return TrainingRun(params, host, base, examples, lineage, tokenizer.pad_token_id), truncated

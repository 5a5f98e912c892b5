"""Fine-tuning one epoch per stage, relaying only what the next epoch needs: the recipe, read top to bottom in the
order a stage runs it. `prepare_run` (base model, tokenizer, training rows, lineage), then `TrainingRun`,
torchtune-shaped: `setup` (model, optimizer, scheduler and the state handed over by the parent epoch or a mid-epoch
checkpoint), `train_epoch` (the loop, one `optimizer_step` per effective batch; under DDP each step's rows are dealt
out across the ranks and only rank 0 writes), `save` (adapter or weights, optimizer, scheduler, RNG, trainer state
and manifest, as one folder swapped in atomically); last, the epoch's report and metrics. Its pieces live beside it:
training data (train_data.py), the model and its speed-ups (train_model.py), the relay folder (relay_folder.py) and
rank arithmetic (distributed.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .distributed import launched_with_fsdp, rank_disagreement, rank_rng_state, rank_seed, rank_share
from .errors import RelaytuneError
from .host import HostProfile, effective_profile
from .io import atomic_folder, atomic_write_json, read_json
from .models import BaseModelRef, load_tokenizer, resolve_base_model
from .params import PARAMS_HASH_KEYS, Params, select_params
from .provenance import accelerator, library_versions
from .paths import MANIFEST, OPTIMIZER, RNG, SCALER, SCHEDULER, TRAINER_STATE
from .relay_folder import (Lineage, TrainerState, check_lineage, data_hash, file_hashes, folder_size_mb,
                           load_tensor_file, params_hash, parent_summary, remove_stale_temp_folders,
                           restore_rng_state, rng_state, verify_epoch_folder)
from .sharding import (check_fsdp_host, clip_gradients, count_parameters, full_state_dicts,
                       join_single_process_group, load_full_optimizer_state, optimizer_state_casts,
                       resolve_distributed, shard_model, trainable_names, unwrapped)
from .train_data import (Example, answer_token_count, collate, epoch_batches, load_training_rows, micro_batches,
                         tokenize_rows)
from .train_model import (FIT_FILL, FLEX_BLOCK_TOKENS, card_memory_bytes, check_packing, compile_decoder_layers,
                          compute_capability, count_4bit_layers, fit_memory_plan, load_model, peak_memory_gib,
                          trainable_parameters, training_device, training_dtype)

log = logging.getLogger(__name__)


def prepare_run(params: Params, host: HostProfile, data_path: str | Path) -> tuple[TrainingRun, int]:
    """Resolve the base model, tokenize the training file, and return the run (not set up yet) and the number of
    truncated rows."""
    t = params.train
    base = resolve_base_model(params.model)
    tokenizer = load_tokenizer(base.path, params.model.trust_remote_code)
    examples, truncated = tokenize_rows(load_training_rows(data_path), tokenizer, t.max_seq_len, t.overflow,
                                        str(data_path))
    lineage = Lineage(base.content_hash, params_hash(params), data_hash(data_path))
    return TrainingRun(params, host, base, examples, lineage, tokenizer.pad_token_id), truncated


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
        distributed = self._distributed_engine(host)
        if distributed == "fsdp":
            check_fsdp_host(params.train.method, self.device, host.fsdp_cpu_offload)
            join_single_process_group(self.device)
        capability = compute_capability(self.device)
        self.host = effective_profile(host.model_copy(update={"distributed": distributed}), self.device,
                                      str(self.dtype).removeprefix("torch."), capability, self.num_processes)
        self.fsdp = distributed == "fsdp"
        t = params.train
        share = math.ceil(t.effective_batch_size / self.num_processes)  # rows of a step that one process computes
        self.micro_batch_size = min(host.micro_batch_size or share, share)
        self.steps_per_epoch = math.ceil(len(examples) / t.effective_batch_size)
        # handoff=adapter: every epoch is a fresh run from the previous adapter, with its own schedule.
        self.schedule_steps = self.steps_per_epoch * (t.epochs if t.handoff == "state" else 1)
        self.state = TrainerState(steps_per_epoch=self.steps_per_epoch, data_order_seed=params.seed)
        self.parent: dict | None = None  # manifest of the epoch this run continues
        self.optimisations: dict = {}  # what setup applied of the host profile's speed-ups, or why not
        self.relay_change: dict | None = None  # how the state this run restored was saved, where that differs

    def _distributed_engine(self, host: HostProfile) -> str:
        """ddp or fsdp: as the host profile (or `accelerate launch --use_fsdp`) asks, else picked for the method and
        the card (sharding.resolve_distributed)."""
        if host.distributed == "ddp" and launched_with_fsdp():
            raise RelaytuneError("started by accelerate launch with FSDP (ACCELERATE_USE_FSDP), but the host profile "
                                 "says distributed: ddp; change one of them")
        asked = host.distributed or ("fsdp" if launched_with_fsdp() else None)
        if asked is not None or self.params.train.method != "full" or self.device != "cuda":
            return resolve_distributed(asked, self.params.train.method, 0, None, FIT_FILL)
        parameters = count_parameters(self.base.path, self.params.model.trust_remote_code)
        return resolve_distributed(None, "full", parameters, card_memory_bytes(), FIT_FILL)

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
        if source is not None and self.params.train.method != "full":
            self._load_adapter(source)  # into the whole model, before FSDP shards it
        self.trained_names = trainable_names(self.model)  # before FSDP1 renames them
        if self.fsdp:
            self.model, self.optimisations["fsdp"] = shard_model(self.model, self.device, self.host.fsdp_cpu_offload,
                                                                 self.params.train.method)
        if self.host.packing:
            self.optimisations["packing"] = check_packing(self.model, self.examples, self.device, self.dtype,
                                                          required=bool(self.requested_host.packing))
            if not self.optimisations["packing"]["applied"]:
                self.host = self.host.model_copy(update={"packing": False})
        if self.host.compile:
            self.optimisations["compile"] = compile_decoder_layers(self.model)
        t = self.params.train
        self.optimizer = self._new_optimizer()
        self.scheduler = self._new_scheduler()
        use_scaler = self.device == "cuda" and self.dtype == torch.float16
        self.scaler = None
        if use_scaler:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            # FSDP's scaler agrees on an inf or nan across every rank's shard of the gradients.
            self.scaler = ShardedGradScaler("cuda") if self.fsdp else torch.amp.GradScaler("cuda")
        if source is not None:
            self.relay_change = relay_change(manifest, self.host, str(self.dtype).removeprefix("torch."))
            self._restore(source, exact=checkpoint_dir is not None or t.handoff == "state")
        if self.device == "cuda" and self.host.micro_batch_tokens is None:
            self._fit_token_budget()
        self._check_ranks_agree()
        self.train_model = self._wrap_for_ddp()

    def _restore(self, source: Path, exact: bool) -> None:
        """The trainer state of `source` (its weights are loaded already); with `exact`, also optimizer, scheduler,
        scaler and RNG. The optimizer's moments keep the dtype they were saved in where the parameters have it; a
        cast is logged and recorded in the manifest."""
        self.state = TrainerState(**read_json(source / TRAINER_STATE))
        if exact:
            saved = load_tensor_file(source / OPTIMIZER, "cpu" if self.fsdp else self.device)
            casts = optimizer_state_casts(saved, trainable_parameters(self.model))
            if casts:
                log.warning("%s: optimizer state cast on load: %s", source / OPTIMIZER, casts)
                self.relay_change = {**(self.relay_change or {}), "optimizer_state_cast": casts}
            if self.fsdp:
                load_full_optimizer_state(self.model, self.optimizer, saved, self.trained_names)
            else:
                self.optimizer.load_state_dict(saved)
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
        each step's last backward) under a launcher, the model itself otherwise (and under FSDP, which shards it in
        place)."""
        if not torch.distributed.is_initialized() or self.fsdp:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if self.device == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _fit_token_budget(self) -> None:
        """Gradient checkpointing (where the profile leaves it null) and the token budget, fitted to the card; every
        rank takes the same: checkpointing stays on if any rank needs it, and the budget is the smallest rank's."""
        from accelerate.utils import gather_object

        ceiling = self.micro_batch_size * self.params.train.max_seq_len
        fit_plan = functools.partial(fit_memory_plan, self.model, self.dtype, self.model.config.vocab_size, ceiling)
        asked = self.requested_host.gradient_checkpointing
        plan = fit_plan(self._tokens_needed_without_checkpointing(), asked)
        if asked is None and not all(p["gradient_checkpointing"] is False for p in gather_object([plan])):
            if plan["gradient_checkpointing"] is False:  # this rank could drop it, another cannot
                plan = fit_plan(0, checkpointing=True)
        budget = min(gather_object([plan["budget"]]))
        self.host = self.host.model_copy(update={"micro_batch_tokens": budget,
                                                 "gradient_checkpointing": plan["gradient_checkpointing"]})
        self.optimisations["token_budget"] = {**plan, "budget": budget}

    def _tokens_needed_without_checkpointing(self) -> int:
        """Tokens a micro-batch must hold to train without checkpointing: the longest row (a row is never split) and
        the median step's share of this rank (so that most steps stay one micro-batch)."""
        t = self.params.train
        steps = epoch_batches(len(self.examples), t.effective_batch_size, self.params.seed, self.state.epoch + 1)
        shares = [sum(len(self.examples[i].input_ids) for i in rank_share(step, self.rank, self.num_processes))
                  for step in steps]
        return max(max(len(e.input_ids) for e in self.examples), int(np.median(shares)))

    def _check_ranks_agree(self) -> None:
        """Every rank must start from the same lineage and resume state; hosts that read different files stop here."""
        from accelerate.utils import gather_object

        mine = {"lineage": asdict(self.lineage), "rows": len(self.examples), "epoch": self.state.epoch,
                "global_step": self.state.global_step, "step_in_epoch": self.state.step_in_epoch}
        problem = rank_disagreement(gather_object([mine]))
        if problem:
            raise RelaytuneError(problem)

    def _new_optimizer(self) -> torch.optim.AdamW:
        t = self.params.train
        return torch.optim.AdamW(trainable_parameters(self.model), lr=t.learning_rate, weight_decay=t.weight_decay)

    def _new_scheduler(self):
        from transformers import get_scheduler

        t = self.params.train
        return get_scheduler(t.lr_scheduler, self.optimizer,
                             num_warmup_steps=round(t.warmup_ratio * self.schedule_steps),
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
            self.optimizer = self._new_optimizer()
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
        n_answer_tokens = answer_token_count(rows)
        own = rank_share(rows, self.rank, self.num_processes)
        # DDP averages gradients over the ranks, and each rank's loss is already a share of the whole batch's sum.
        weight = float(self.num_processes)
        if not own:  # fewer rows than processes: this rank still joins the gradient all-reduce, with zero weight
            own, weight = rows[:1], 0.0
        groups = micro_batches([len(e.input_ids) for e in own], self.micro_batch_size, self.host.micro_batch_tokens)
        total_loss = 0.0
        tokens = 0
        autocast = torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32)
        min_packed = FLEX_BLOCK_TOKENS if self.host.attn_implementation == "flex_attention" else 0
        try:
            for index, group in enumerate(groups):
                micro = [own[i] for i in group]
                batch = {k: v.to(self.device) for k, v in
                         collate(micro, self.pad_token_id, self.host.packing, min_packed).items()}
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
        clip_gradients(self.model, trainable_parameters(self.model), self.params.train.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, tokens

    def _gradient_sync(self, sync: bool):
        """DDP and FSDP1 reduce gradients at every backward outside no_sync(), FSDP2 where its flag is on: once per
        step, at its last micro-batch."""
        if hasattr(self.train_model, "set_requires_gradient_sync"):  # FSDP2
            self.train_model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
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
        full = self.params.train.method == "full"
        weights, optimizer_state = None, None
        if self.fsdp:  # gathered whole onto rank 0: the folder has one form whatever world size wrote it
            weights, optimizer_state = full_state_dicts(self.model, self.optimizer,
                                                        None if full else self.trained_names, self.device)
        if not self.is_main:
            return None
        directory = Path(directory)
        remove_stale_temp_folders(directory)
        with atomic_folder(directory) as tmp:
            with unwrapped(self.model) as model:
                if full:
                    model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
                else:
                    model.save_pretrained(tmp, state_dict=weights)  # adapter_model.safetensors + adapter_config.json
            torch.save(optimizer_state or self.optimizer.state_dict(), tmp / OPTIMIZER)
            torch.save(self.scheduler.state_dict(), tmp / SCHEDULER)
            torch.save({**rng_states[0], "other_ranks": rng_states[1:]}, tmp / RNG)
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), tmp / SCALER)
            atomic_write_json(tmp / TRAINER_STATE, asdict(self.state))
            manifest = self.manifest(tmp, peak_memory, manifest_extra or {})
            atomic_write_json(tmp / MANIFEST, manifest)
        return manifest

    def manifest(self, folder: Path, peak_memory: float, extra: dict) -> dict:
        return {
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "method": self.params.train.method,
            "handoff": self.params.train.handoff,
            "lineage": asdict(self.lineage),
            "math_params": select_params(self.params, PARAMS_HASH_KEYS),
            "parent": parent_summary(self.parent),
            "restored_state_saved_differently": self.relay_change,
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
            "files": file_hashes(folder),
            **extra,
        }


def relay_change(saved: dict, host: HostProfile, dtype: str) -> dict | None:
    """How the run that saved a relay folder (its manifest `saved`) differs from this one in world size, engine and
    dtype: the folder's form is the same, and the manifest says what changed. None where nothing did. Pure."""
    before = saved["host"]
    was = {"num_processes": before.get("num_processes", 1), "dtype": before.get("dtype"),
           "distributed": before.get("effective_profile", {}).get("distributed") or "ddp"}
    now = {"num_processes": host.num_processes, "dtype": dtype, "distributed": host.distributed}
    changed = {k: {"saved": was[k], "now": now[k]} for k in was if was[k] != now[k]}
    if changed:
        log.info("continuing state saved with %s", changed)
    return changed or None


# ---------------------------------------------------------------- the epoch's report

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

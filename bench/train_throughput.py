"""QLoRA training throughput on a randomly initialised Mistral-7B-shaped model: the plain HF stack against
relaytune's training path, the same rows, effective batch, optimizer and schedule for each. Prints one JSON object.

On a GPU host (the device machine):  python3 -m bench.train_throughput --out $OUT/train_throughput.json

Contenders (each in its own process: Liger patches transformers' classes process-wide, and peak memory is per process):
  hf         what a tutorial user writes: transformers + peft + bitsandbytes NF4 double-quant, LoRA r=16 on all seven
             projections, prepare_model_for_kbit_training with gradient checkpointing, bf16 autocast (as Trainer's
             bf16=True), rows padded per micro-batch, the whole effective batch in one micro-batch.
  hf_fp16    the same on a card without bf16 (T4, P100): fp16 compute dtype and autocast with a GradScaler (as
             Trainer's fp16=True).
  unsloth    Unsloth's FastLanguageModel on the same rows: NF4 4-bit, LoRA r=16 on the seven projections, its own
             gradient checkpointing ("unsloth"), bf16, the whole effective batch in one padded micro-batch.
  relaytune  relaytune.train.TrainingRun with its defaults (host profile and params as shipped).
  more, as NAME=KEY=VALUE,...: relaytune with host-profile knobs (RELAYTUNE_* variables) or train.* params changed,
             e.g. --variant padded=packing=false; processes=N runs it under torchrun on N processes (DDP, one per
             GPU; N=1 too, which measures the DDP wrapper alone), e.g. --variant ddp2=processes=2; emulate=t4 runs
             it as --emulate does; contender=hf_fp16 (or hf, unsloth) measures that contender under the name instead,
             e.g. --variant hf_fp16_t4=contender=hf_fp16,emulate=t4
--goals adds issue #16's goals, measured from the contenders named relaytune, relaytune_2, relaytune_3 (bf16), t4 and
hf_fp16_t4 (emulated T4) and lean (the lean host setting): each goal, the measured value and the distance.
--table FILE prints the README's markdown table of a results file.
--emulate t4 runs hf_fp16 and every relaytune contender as on a T4: the allocator is capped at 15.0 GiB, and relaytune
reads compute capability 7.5, no bf16 and 15.0 GiB, so it resolves the T4's profile (fp16 with loss scaling, sdpa, no
compiled layers, fp32 frozen weights, a token budget fitted to 15 GiB); a P100 (6.0, 15.9 GiB) resolves the same.
hf (bf16) stays the machine's own, the reference. It is an emulation on the machine at hand: the kernels are that
machine's, so it measures the profile, not the card.
Weight values do not change speed, so the model is random; the first steps' losses still check that two contenders
compute the same thing (LoRA B starts at zero, so step 1 is the base model's loss in both).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Mistral-7B-Instruct-v0.3's shape.
MISTRAL_7B = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6,
                  sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# A few-MB model of the same family, for checking this script on a CPU (--shape tiny).
TINY = {**MISTRAL_7B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
SHAPES = {"mistral-7b": MISTRAL_7B, "tiny": TINY}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12}
PAD_TOKEN_ID = 0
SEED = 1234
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


# ---------------------------------------------------------------- model and rows

def build_random_model(directory: Path, shape: dict) -> None:
    """A bf16 model of `shape` with random weights, saved as safetensors (about 14.5 GB for the 7B shape)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    if (directory / "config.json").exists():
        return
    torch.manual_seed(SEED)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(MistralConfig(**shape), dtype=torch.bfloat16)
    model.save_pretrained(directory)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    from relaytune.train_model import peak_memory_gib as peak

    return round(peak(DEVICE), 2)


def non_embedding_params(shape: dict) -> int:
    """Parameters a token's forward pass multiplies by (the input embedding is a lookup): for 6N FLOPs per token."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * per_layer + h + shape["vocab_size"] * h


def realistic_lengths(n: int, median: int, sigma: float, cap: int, seed: int) -> list[int]:
    """Advice-answer rows: lognormal token lengths (median `median`), cut at `cap`, at least 32 tokens."""
    lengths = np.random.default_rng(seed).lognormal(np.log(median), sigma, n)
    return np.clip(lengths.round(), 32, cap).astype(int).tolist()


def make_rows(lengths: list[int], vocab: int, seed: int):
    """Random token rows; the first quarter (at most 64 tokens) is the prompt, masked out of the loss."""
    from relaytune.train_data import IGNORE_INDEX, Example

    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, vocab, n).tolist()
        prompt = min(64, n // 4)
        rows.append(Example(f"row{i}", i + 1, ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def batches(rows: list, effective_batch_size: int) -> list[list]:
    return [rows[i:i + effective_batch_size] for i in range(0, len(rows), effective_batch_size)]


# ---------------------------------------------------------------- contenders

def padded_step_loop(model, steps_total: int, dtype):
    """The optimizer step a tutorial's loop (or Trainer) runs: the whole effective batch padded into one micro-batch,
    autocast in `dtype` (float16: with a GradScaler, as Trainer's fp16=True), clipping, AdamW at 2e-4 with the
    cosine schedule after 3% warm-up. Returns the step function."""
    from transformers import get_scheduler

    from relaytune.train_data import collate

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=round(0.03 * steps_total),
                              num_training_steps=steps_total)
    scaler = torch.amp.GradScaler(DEVICE) if dtype == torch.float16 else None

    def step(rows) -> float:
        batch = {k: v.to(DEVICE) for k, v in collate(rows, PAD_TOKEN_ID, packing=False).items()}
        with torch.autocast(DEVICE, dtype=dtype):
            loss = model(**batch).loss
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
        else:  # Trainer's fp16 path: scale, unscale before clipping, skip the step on inf/nan
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def hf_baseline(model_dir: Path, steps_total: int, dtype=torch.bfloat16):
    """The plain HF stack, as a tutorial writes it, computing in `dtype` (float16: with a GradScaler, as Trainer's
    fp16=True); returns a function that runs one optimizer step."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(SEED)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": DEVICE},
                                                 dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.config.use_cache = False
    step = padded_step_loop(model, steps_total, dtype)
    return step, {"optimisations": "none", "micro_batch": "whole effective batch, padded",
                  "dtype": str(dtype).removeprefix("torch.")}


def word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A tokenizer of `vocab_size` plain tokens saved beside the random model: Unsloth's loader wants one, and one of
    the model's own size keeps it from resizing the embeddings. The rows are token ids already: it never encodes."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if (directory / "tokenizer.json").exists():
        return
    model = WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model), pad_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(directory)


def unsloth_path(model_dir: Path, steps_total: int, vocab_size: int):
    """Unsloth's own QLoRA path (FastLanguageModel), stepped by the same loop as hf."""
    from unsloth import FastLanguageModel  # first: it patches transformers and peft on import

    import unsloth

    word_tokenizer(model_dir, vocab_size)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=1024,
                                                 dtype=torch.bfloat16, load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                             lora_dropout=LORA["lora_dropout"],
                                             target_modules=LORA["target_modules"],
                                             use_gradient_checkpointing="unsloth", random_state=SEED)
    step = padded_step_loop(model, steps_total, torch.bfloat16)
    return step, {"optimisations": "unsloth", "unsloth": unsloth.__version__,
                  "micro_batch": "whole effective batch, padded"}


# A 16 GB card without bf16, as relaytune's host profile reads it (its memory as torch reports it: a T4 has 15.0 GiB,
# a P100 15.9 GiB).
EMULATED = {"t4": {"capability": (7, 5), "bf16": False, "memory_gib": 15.0},
            "p100": {"capability": (6, 0), "bf16": False, "memory_gib": 15.9}}


def emulate(card: str, relaytune: bool) -> None:
    """Cap this process's allocator at `card`'s memory, so that what would not fit there fails here too; and for
    relaytune, make what its host profile reads of the card (train_model: compute capability, memory; the dtype
    "auto" resolves to) answer as `card` does. torch itself keeps the real card's answers: Triton and Liger compile
    their kernels for the card the process runs on."""
    import relaytune.train as train
    import relaytune.train_model as train_model

    spec = EMULATED[card]
    memory = int(spec["memory_gib"] * 2**30)
    torch.cuda.set_per_process_memory_fraction(memory / torch.cuda.get_device_properties(0).total_memory)
    if relaytune:
        train.compute_capability = lambda device: spec["capability"]
        train_model.card_memory_bytes = lambda: memory
        auto = train_model.training_dtype
        train.training_dtype = lambda host: torch.float16 if host.dtype == "auto" and not spec["bf16"] else auto(host)


def relaytune_path(model_dir: Path, steps_total: int, rows, train_overrides: dict):
    """relaytune's own TrainingRun, set up as a train_epoch stage would be on this host."""
    from relaytune.host import load_host_profile
    from relaytune.models import BaseModelRef
    from relaytune.params import Params
    from relaytune.relay_folder import Lineage
    from relaytune.train import TrainingRun

    effective = 8
    params = Params.model_validate({"seed": SEED, "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"],
                                                           "dropout": LORA["lora_dropout"]},
                                    "train": {"method": "qlora", "effective_batch_size": effective,
                                              "max_seq_len": 1024, **train_overrides}})
    base = BaseModelRef(spec=str(model_dir), path=model_dir, content_hash="sha256:random-mistral-7b-shape",
                        source="local-dir")
    run = TrainingRun(params, load_host_profile(), base, rows, Lineage(base.content_hash, "bench", "bench"),
                      PAD_TOKEN_ID)
    run.schedule_steps = steps_total
    run.setup()

    def step(rows) -> float:
        return run.optimizer_step(rows)[0]

    return step, {"effective_host_profile": run.host.model_dump(), "optimisations": run.optimisations,
                  "micro_batch_size": run.micro_batch_size}


def measure(step, steps: list[list], warmup: int, profile: bool) -> dict:
    synchronize()
    reset_peak_memory()
    losses, times = [], []
    for i, rows in enumerate(steps):
        if profile and i == warmup:
            return {"profile": profile_steps(step, steps[i:i + 2])}
        started = time.perf_counter()
        losses.append(step(rows))
        synchronize()
        times.append(time.perf_counter() - started)
    measured = times[warmup:]
    real_tokens = sum(len(r.input_ids) for rows in steps[warmup:] for r in rows)
    return {"steps_measured": len(measured), "median_step_s": round(statistics.median(measured), 4),
            "real_tokens_per_s": round(real_tokens / sum(measured), 1),
            "peak_memory_gib": peak_memory_gib(),
            "first_losses": [round(x, 5) for x in losses[:3]], "warmup_s": round(sum(times[:warmup]), 1)}


def profile_steps(step, steps: list[list]) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for rows in steps:
            step(rows)
        synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)


def run_contender(args) -> dict:
    """One contender in this process: the realistic mix, then the study's configuration (8 rows of 1024 tokens)."""
    vocab = SHAPES[args.shape]["vocab_size"]
    rows = make_rows(realistic_lengths(args.rows, args.median, args.sigma, 1024, SEED), vocab, SEED)
    study_rows = make_rows([1024] * 8 * 3, vocab, SEED + 1)
    steps = batches(rows, 8)
    started = time.perf_counter()
    if args.emulate and args.contender in ("hf_fp16", "relaytune"):  # hf (bf16) and unsloth stay the reference
        emulate(args.emulate, relaytune=args.contender == "relaytune")
    if args.contender in ("hf", "hf_fp16"):
        step, setup = hf_baseline(args.model_dir, len(steps), torch.float16 if args.contender == "hf_fp16"
                                  else torch.bfloat16)
    elif args.contender == "unsloth":
        step, setup = unsloth_path(args.model_dir, len(steps), vocab)
    else:
        step, setup = relaytune_path(args.model_dir, len(steps), rows, json.loads(args.train_overrides))
    result = {"contender": args.contender, "setup": setup, "load_s": round(time.perf_counter() - started, 1),
              "emulated": args.emulate if args.contender in ("hf_fp16", "relaytune") else None}
    result["realistic_mix"] = measure(step, steps, args.warmup, args.profile_steps)
    if not args.profile_steps:
        study = measure(step, batches(study_rows, 8), 1, False)
        result["study_config_seq1024_batch8"] = {k: study[k] for k in ("peak_memory_gib", "real_tokens_per_s",
                                                                       "median_step_s")}
    return result


# ---------------------------------------------------------------- driver

BASE_CONTENDERS = ("hf", "hf_fp16", "unsloth", "relaytune")


def parse_variant(text: str) -> tuple[str, dict]:
    """NAME=KEY=VALUE,... -> (name, {"contender", "env": RELAYTUNE_* environment, "train": train.* overrides,
    "processes": torchrun processes or None, "emulate": card or None})."""
    name, _, spec = text.partition("=")
    variant = {"contender": name if name in BASE_CONTENDERS else "relaytune", "env": {}, "train": {},
               "processes": None, "emulate": None}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("train."):
            variant["train"][key.removeprefix("train.")] = json.loads(value)
        elif key == "processes":
            variant["processes"] = int(value)
        elif key == "emulate":
            if value not in EMULATED:
                raise SystemExit(f"--variant {name}: emulate={value}, expected one of {', '.join(EMULATED)}")
            variant["emulate"] = value
        elif key == "contender":
            if value not in BASE_CONTENDERS:
                raise SystemExit(f"--variant {name}: contender={value}, expected one of {', '.join(BASE_CONTENDERS)}")
            variant["contender"] = value
        else:
            variant["env"]["RELAYTUNE_" + key.upper()] = value
    return name, variant


def failure_line(stderr: str) -> str:
    """The line of a failed contender's stderr that names the error (the exception's own line, not the hint torch
    prints after it)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or ["failed, with nothing on stderr"])[-1][:500]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b")
    parser.add_argument("--model-dir", type=Path, help="default: /tmp/random-<shape>")
    parser.add_argument("--rows", type=int, default=128, help="rows of the realistic mix (8 per step)")
    parser.add_argument("--median", type=int, default=300)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--contenders", default="hf,relaytune", help="any of hf, hf_fp16, unsloth, relaytune")
    parser.add_argument("--emulate", choices=sorted(EMULATED), help="resolve relaytune's profile as on this card")
    parser.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,... (see above)")
    parser.add_argument("--profile", default=None, help="print the top CUDA kernels of this contender instead")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--goals", action="store_true", help="add issue #16's goals to the report (see above)")
    parser.add_argument("--table", type=Path, help="print the markdown table of this results file, and stop")
    # internal: run one contender in this process
    parser.add_argument("--contender")
    parser.add_argument("--train-overrides", default="{}")
    parser.add_argument("--profile-steps", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    args.model_dir = args.model_dir or Path(f"/tmp/random-{args.shape}")
    if args.contender:
        result = run_contender(args)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(json.dumps(result))
        return

    build_random_model(args.model_dir, SHAPES[args.shape])
    variants = dict(parse_variant(name) for name in BASE_CONTENDERS)
    variants.update(parse_variant(v) for v in args.variant)
    names = [n for n in args.contenders.split(",") if n] + [parse_variant(v)[0] for v in args.variant]
    if args.profile:
        names = [args.profile]
    results = {}
    for name in names:
        variant = variants[name]
        processes, emulated = variant["processes"], variant["emulate"] or args.emulate
        launcher = [] if processes is None else ["-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc-per-node={processes}"]
        cmd = [sys.executable, *launcher, "-m", "bench.train_throughput", "--contender", variant["contender"],
               "--shape", args.shape, "--model-dir", str(args.model_dir), "--rows", str(args.rows),
               "--median", str(args.median), "--sigma", str(args.sigma), "--warmup", str(args.warmup),
               "--train-overrides", json.dumps(variant["train"])]
        if args.profile:
            cmd.append("--profile-steps")
        if emulated:
            cmd += ["--emulate", emulated]
        proc = subprocess.run(cmd, env={**os.environ, **variant["env"]}, capture_output=True, text=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            (args.out.parent / f"{name}.stderr.log").write_text(proc.stderr)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            results[name] = {"error": failure_line(proc.stderr), "stderr_log": f"{name}.stderr.log"}
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name]["env"], results[name]["train_overrides"] = variant["env"], variant["train"]
            results[name]["processes"] = processes or 1
        if args.profile:
            print(results[name].get("realistic_mix", {}).get("profile", results[name]))
            return
        report = summarise(results, args)
        print(f"{name}: {json.dumps(results[name].get('realistic_mix', results[name]))}", file=sys.stderr, flush=True)
        if args.out:  # after every contender, so that a run cut short keeps what it measured
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print_table(report)


def summarise(results: dict, args) -> dict:
    import peft
    import transformers

    gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    n = non_embedding_params(SHAPES[args.shape])
    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    single = results.get("relaytune", {}).get("realistic_mix") or {}
    for r in results.values():
        mix = r.get("realistic_mix")
        if not mix or "real_tokens_per_s" not in mix:
            continue
        gpus = r.get("processes", 1)
        mix["mfu"] = round(6 * n * mix["real_tokens_per_s"] / (peak * gpus), 4) if peak else None
        if gpus > 1 and "real_tokens_per_s" in single:
            # Strong scaling: the same global batch (the math) dealt over more processes.
            mix["scaling_efficiency_vs_relaytune"] = round(mix["real_tokens_per_s"] / (gpus * single["real_tokens_per_s"]), 3)
        for name in ("hf", "hf_fp16", "hf_fp16_t4"):  # the bf16 tutorial stack; the one a card without bf16 runs
            base = results.get(name, {})
            if not base.get("realistic_mix") or r is base:
                continue
            mix[f"speedup_vs_{name}"] = round(mix["real_tokens_per_s"] / base["realistic_mix"]["real_tokens_per_s"], 3)
            mix[f"first_loss_rel_diff_vs_{name}"] = round(
                abs(mix["first_losses"][0] - base["realistic_mix"]["first_losses"][0])
                / base["realistic_mix"]["first_losses"][0], 6)
            study, base_study = r.get("study_config_seq1024_batch8"), base.get("study_config_seq1024_batch8")
            if study and base_study:
                study[f"memory_ratio_vs_{name}"] = round(study["peak_memory_gib"] / base_study["peak_memory_gib"], 3)
    report = {"benchmark": "train_throughput", "shape": args.shape, "gpu": gpu, "emulated_card": args.emulate,
              "peak_bf16_flops": peak, "flops_per_token": f"6N, N={n}",
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                         "peft": peft.__version__, "bitsandbytes": bnb},
            "rows": {"n": args.rows, "lognormal_median": args.median, "sigma": args.sigma, "cap": 1024,
                     "effective_batch_size": 8, "warmup_steps": args.warmup},
            "contenders": results}
    if args.goals:
        report["goals"] = issue16_goals(results)
    return report


def speed(results: dict, name: str, reference: str) -> float | None:
    return results.get(name, {}).get("realistic_mix", {}).get(f"speedup_vs_{reference}")


def issue16_goals(results: dict) -> dict:
    """Issue #16's goals against what this call measured: each one's target, value, whether it is met and the
    distance (value / target for speed, target / value for memory, so that under 1 means short of it)."""
    def goal(value, target, met, distance, **more):
        return {"target": target, "value": value, "met": met, "distance": distance, **more}

    goals = {}
    repeats = [speed(results, n, "hf") for n in ("relaytune", "relaytune_2", "relaytune_3")]
    if all(repeats):
        median = statistics.median(repeats)
        goals["bf16_speedup_vs_hf"] = goal(median, 4.0, median >= 4.0 and min(repeats) > 3.0, round(median / 4.0, 3),
                                           repeats=repeats, each_above=3.0)
    t4 = results.get("t4", {})
    t4_speed = speed(results, "t4", "hf_fp16_t4")
    if t4_speed:
        t4_gib = t4["study_config_seq1024_batch8"]["peak_memory_gib"]
        goals["t4_speedup_vs_hf_fp16"] = goal(t4_speed, 2.0, t4_speed >= 2.0 and t4_gib < 14.0,
                                              round(t4_speed / 2.0, 3), study_config_gib=t4_gib,
                                              study_config_gib_below=14.0)
    lean = results.get("lean", {}).get("study_config_seq1024_batch8", {})
    hf = results.get("hf", {}).get("study_config_seq1024_batch8", {})
    if lean and hf:
        ratio = round(lean["peak_memory_gib"] / hf["peak_memory_gib"], 3)
        goals["lean_memory_vs_hf"] = goal(ratio, 0.4, ratio <= 0.4, round(0.4 / ratio, 3),
                                          speedup_vs_hf=speed(results, "lean", "hf"))
    losses = {n: r["realistic_mix"]["first_losses"][0] for n, r in results.items() if "realistic_mix" in r}
    if len(losses) > 1:
        spread = (max(losses.values()) - min(losses.values())) / min(losses.values())
        goals["step1_losses_agree"] = goal(round(spread, 6), 1e-3, spread <= 1e-3, None)
    return goals


def markdown_table(report: dict) -> str:
    """The README's table of one results file: setup, tokens/s, × hf (and × hf_fp16 for the emulated T4), peak
    memory, MFU, step-1 loss agreement and the study configuration's memory."""
    rows = ["| contender | setup | real tokens/s | × hf | × hf_fp16 | peak GiB | MFU (6N) | step-1 loss, rel. diff "
            "to hf | peak GiB, seq 1024 × 8 (× hf) | budget, checkpointing |", "|" + "---|" * 10]
    for name, r in report["contenders"].items():
        if "realistic_mix" not in r:
            rows.append(f"| {name} | failed: `{r.get('error')}` |" + " |" * 8)
            continue
        mix, study, setup = r["realistic_mix"], r.get("study_config_seq1024_batch8", {}), r["setup"]
        profile = setup.get("effective_host_profile", {})
        if profile:
            what = (f"relaytune, {profile['dtype']}, {profile['attn_implementation'] or 'sdpa'}, "
                    f"compile {'on' if profile['compile'] else 'off'}")
        elif "unsloth" in setup:
            what = f"Unsloth {setup['unsloth']}, bfloat16"
        else:
            what = f"plain HF stack, {setup.get('dtype')} autocast"
        if r.get("emulated"):
            what += f", emulated {r['emulated']}"
        if r.get("env") or r.get("train_overrides"):
            what += ", " + ", ".join(f"{k.removeprefix('RELAYTUNE_').lower()}={v}"
                                     for k, v in {**r.get("env", {}), **r.get("train_overrides", {})}.items())
        fit = setup.get("optimisations", {}).get("token_budget", {}) if profile else {}
        budget = (f"{profile['micro_batch_tokens'] or 'no limit'}, {'on' if profile['gradient_checkpointing'] else 'off'}"
                  + (" (fitted)" if fit else "")) if profile else "whole step, on"
        loss_diff = mix.get("first_loss_rel_diff_vs_hf")
        fp16 = mix.get("speedup_vs_hf_fp16") or mix.get("speedup_vs_hf_fp16_t4")
        rows.append(f"| {name} | {what} | {mix['real_tokens_per_s']:,.0f} | {mix.get('speedup_vs_hf', 1.0):.2f} | "
                    f"{'' if fp16 is None else f'{fp16:.2f}'} | {mix['peak_memory_gib']:.2f} | "
                    f"{100 * (mix.get('mfu') or 0):.1f}% | {'—' if loss_diff is None else f'{loss_diff:.1e}'} | "
                    f"{study.get('peak_memory_gib', float('nan')):.2f} ({study.get('memory_ratio_vs_hf', 1.0):.2f}) | "
                    f"{budget} |")
    goals = [f"- goal `{name}`: {g['value']} against {g['target']}: {'met' if g['met'] else 'not met'}"
             + (f" (distance {g['distance']})" if g["distance"] else "") for name, g in report.get("goals", {}).items()]
    return "\n".join(rows + ([""] + goals if goals else []))


def print_table(report: dict) -> None:
    print(f"\n{'contender':<22}{'procs':>6}{'real tok/s':>11}{'x hf':>7}{'x fp16':>7}{'median s':>9}{'peak GiB':>9}"
          f"{'MFU':>7}{'loss step1':>11}{'seq1024 GiB':>12}{'x hf mem':>9}{'scaling':>8}")
    for name, r in report["contenders"].items():
        mix, study = r.get("realistic_mix", {}), r.get("study_config_seq1024_batch8", {})
        if "real_tokens_per_s" not in mix:
            print(f"{name:<22}{r.get('error', 'no result')}")
            continue
        print(f"{name:<22}{r.get('processes', 1):>6}{mix['real_tokens_per_s']:>11.0f}{mix.get('speedup_vs_hf', 1.0):>7.2f}"
              f"{mix.get('speedup_vs_hf_fp16', float('nan')):>7.2f}"
              f"{mix['median_step_s']:>9.3f}{mix['peak_memory_gib']:>9.2f}{mix.get('mfu') or 0:>7.3f}"
              f"{mix['first_losses'][0]:>11.4f}{study.get('peak_memory_gib', float('nan')):>12.2f}"
              f"{study.get('memory_ratio_vs_hf', 1.0):>9.2f}{mix.get('scaling_efficiency_vs_relaytune', ''):>8}")


if __name__ == "__main__":
    main()

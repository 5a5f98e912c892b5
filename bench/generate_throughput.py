"""Held-out answer generation, base and tuned: relaytune's generation path (relaytune.generation: batched,
left-padded, KV cache, adapter merged into the base) against one prompt at a time with `model.generate` (the adapter
applied unmerged through peft, as after a training script). The same prompts, greedy, the same token limit; tokens
are those kept before the end-of-sequence token. Prints one JSON object and a short table.

CPU (here):   python -m bench.generate_throughput
              the embedded SmolLM2-135M-Instruct and the pipeline's models/epoch3 adapter
GPU:          python3 -m bench.generate_throughput --shape mistral-7b --tokenizer-dir DIR
              a randomly initialised Mistral-7B-shaped model with DIR's tokenizer and a random r=16 adapter (weight
              values do not change speed; a random model rarely ends early, so rows run to the token limit)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.train_throughput import MISTRAL_7B, SEED

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]


def random_mistral_with_adapter(out: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    """A bf16 Mistral-7B-shaped model sized to the tokenizer's vocabulary, and a random LoRA adapter for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    model_dir, adapter_dir = out / "base", out / "adapter"
    if (adapter_dir / "adapter_config.json").exists():
        return model_dir, adapter_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {**MISTRAL_7B, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
             "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(MistralConfig(**shape), dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, model_dir / name)
    # Not LoRA's zero init: merged or not, the adapter must change the model.
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, init_lora_weights="gaussian")
    get_peft_model(model, lora).save_pretrained(adapter_dir)
    del model
    return model_dir, adapter_dir


def project_path(model_dir: Path, adapter: Path | None, prompts: list[list[dict]], max_new_tokens: int,
                 batch_size: int, dtype: str) -> dict:
    from relaytune.generation import Decoding, GenerationCache, LocalBackend, TextGenerator

    with tempfile.TemporaryDirectory() as cache:  # an empty cache: every row is generated
        generator = TextGenerator(lambda: LocalBackend(model_dir, "bench", dtype, False, adapter), "local", "bench",
                                  GenerationCache(cache), batch_size, {})
        started = time.perf_counter()
        generator.backend.complete(prompts[:batch_size], Decoding(8))  # load and warm up the batch's kernels unclocked
        load_s = time.perf_counter() - started
        completions = generator.generate(prompts, Decoding(max_new_tokens), desc="batched")
    stats = generator.stats
    del generator
    torch.cuda.empty_cache()
    return {"tokens": stats.generated_tokens, "seconds": round(stats.seconds, 2),
            "tokens_per_s": stats.tokens_per_second, "load_s": round(load_s, 1), "texts": [c.text for c in completions]}


def one_at_a_time(model_dir: Path, adapter: Path | None, prompts: list[list[dict]], max_new_tokens: int,
                  dtype: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    eos = tokenizer.eos_token_id
    tokens, seconds, texts = 0, 0.0, []
    for i, messages in enumerate([prompts[0]] + prompts):  # the first, a warm-up, is not counted
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True).to(device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=eos)
        if device == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            continue
        seconds += time.perf_counter() - started
        row = out[0, enc["input_ids"].shape[1]:].tolist()
        kept = row[:row.index(eos)] if eos in row else row
        tokens += len(kept)
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    del model
    torch.cuda.empty_cache()
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2),
            "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["embedded", "mistral-7b"], default="embedded")
    parser.add_argument("--tokenizer-dir", type=Path, help="mistral-7b: a folder with a tokenizer and chat template")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/random-mistral-7b-generate"))
    parser.add_argument("--adapter", type=Path, default=Path("models/epoch3"), help="embedded: the tuned adapter")
    parser.add_argument("--heldout", type=Path, default=Path("data/synth/heldout.jsonl"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="eval.max_new_tokens's default")
    parser.add_argument("--batch-size", type=int, default=16, help="eval.batch_size's default")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from relaytune.io import read_jsonl
    from relaytune.provenance import inference_dtype

    questions = [r["question"] for r in read_jsonl(args.heldout)][:args.prompts]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    dtype = inference_dtype("auto")
    if args.shape == "embedded":
        from relaytune.models import resolve_base_model
        from relaytune.params import ModelParams

        model_dir, adapter = resolve_base_model(ModelParams()).path, args.adapter
    else:
        model_dir, adapter = random_mistral_with_adapter(args.work_dir, args.tokenizer_dir)

    results = {}
    for which, adapter_dir in (("base", None), ("tuned", adapter)):
        batched = project_path(model_dir, adapter_dir, prompts, args.max_new_tokens, args.batch_size, dtype)
        single = one_at_a_time(model_dir, adapter_dir, prompts, args.max_new_tokens, dtype)
        same = sum(a == b for a, b in zip(batched.pop("texts"), single.pop("texts")))
        results[which] = {"relaytune_batched": batched, "one_prompt_at_a_time": single,
                          "speedup": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
                          "identical_answers": f"{same} of {len(prompts)}"}
    import transformers

    report = {"benchmark": "generate_throughput", "shape": args.shape, "model": str(model_dir),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "dtype": dtype,
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "results": results}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    print(f"\n{'model':<7}{'batched tok/s':>15}{'one-at-a-time tok/s':>21}{'speedup':>9}{'identical':>11}")
    for which, r in results.items():
        print(f"{which:<7}{r['relaytune_batched']['tokens_per_s']:>15.1f}{r['one_prompt_at_a_time']['tokens_per_s']:>21.1f}"
              f"{r['speedup']:>9.2f}{r['identical_answers']:>11}")


if __name__ == "__main__":
    main()

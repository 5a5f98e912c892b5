"""A capacity probe for issue #14: can the embedded SmolLM2-135M learn the handbook's facts at all, so that a held-out
phrasing retrieves them, when every training answer is the handbook's own statement with the correct value (an ideal
teacher)? If it can, the default pipeline's failure to learn facts lies in its recipe or its teacher's answers; if it
cannot, in the model's size. Three steps, the middle one on a GPU host (torch, transformers and peft; bitsandbytes
for the qlora runs). MODEL_DIR is the dequantised base (relaytune.models.materialise_gguf's output; the 98 MB GGUF
travels to a GPU host in two carried halves):

  python -m bench.fact_recall prepare --out .gpuprobe/rows.json         # here: the pipeline's own seeded split
  python3 bench/fact_recall.py train .gpuprobe/rows.json MODEL_DIR OUT.json --runs NAME,...   # GPU: greedy answers
  python -m bench.fact_recall score OUT.json .gpuprobe/rows.json > bench/results/NAME.json     # here: the classifier

Each run (RUNS) trains a fresh LoRA (r=16, alpha 32, every linear projection, as params.yaml) on a bf16 base, or on
an NF4 double-quant base (method qlora, bitsandbytes carried as a wheel), at a constant or cosine learning rate after
3% warm-up, batch 8, loss on the answer tokens only, and answers the held-out and the training questions greedily
after each listed epoch; a qlora run answers on its NF4 base, merged into the full-precision base
(eval.merge_into=full_precision) and merged into the dequantised NF4 base it was trained on (trained_base, the
pipeline's default).
"""

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Run:
    per_fact: int  # training phrasings per fact
    lr: float
    method: str = "lora"  # lora: bf16 base | qlora: NF4 double-quant base, as train.method=qlora
    schedule: str = "constant"  # constant | cosine (over the run, as the pipeline's train.lr_scheduler)
    eval_after: tuple[int, ...] = (1, 3, 10)


RUNS = {  # results: fact_recall_h200.json (the first three), fact_recall_nf4_h200.json (k7 NF4 and cosine)
    "k2-lr0.0002": Run(2, 2e-4), "k2-lr0.001": Run(2, 1e-3), "k7-lr0.0002": Run(7, 2e-4), "k7-lr0.001": Run(7, 1e-3),
    "k7-lr0.0002-lora-cosine": Run(7, 2e-4, "lora", "cosine", (3,)),
    "k7-lr0.0002-qlora-cosine": Run(7, 2e-4, "qlora", "cosine", (3,)),
    "k2-lr0.001-lora-cosine": Run(2, 1e-3, "lora", "cosine", (3,)),
    "k2-lr0.001-qlora-cosine": Run(2, 1e-3, "qlora", "cosine", (3,)),
    # fact_recall_constant_*.json: the pipeline's method (NF4) at train.lr_scheduler=constant_with_warmup
    "k7-lr0.001-qlora": Run(7, 1e-3, "qlora", "constant", (1, 2, 3)),
    "k4-lr0.001-qlora": Run(4, 1e-3, "qlora", "constant", (3,)),
    "k2-lr0.001-qlora": Run(2, 1e-3, "qlora", "constant", (3,)),
    "k7-lr0.0005-qlora": Run(7, 5e-4, "qlora", "constant", (3,)),
    "k7-lr0.0002-qlora": Run(7, 2e-4, "qlora", "constant", (3,)),
}


def prepare(out: str, seed: int) -> None:
    """The pipeline's split (relaytune.handbook.split_questions) with every training phrasing, and its answers."""
    from relaytune.handbook import load_handbook, split_questions

    handbook = load_handbook("data/handbook/facts.yaml")
    train, heldout = split_questions(handbook, seed, heldout_per_fact=1, max_facts=None, train_per_fact=None)
    answer = {f.id: f.statement_with(f.correct.value) for f in handbook.facts}
    rows = {"seed": seed,
            "train": [{"fact_id": q.fact_id, "question": q.question, "answer": answer[q.fact_id]} for q in train],
            "heldout": [{"fact_id": q.fact_id, "question": q.question} for q in heldout]}
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{out}: {len(rows['train'])} training rows, {len(rows['heldout'])} held-out questions")


def first_per_fact(rows: list[dict], per_fact: int) -> list[dict]:
    """The first `per_fact` training rows of each fact (the pipeline's train_phrasings_per_fact)."""
    taken: Counter = Counter()
    kept = []
    for row in rows:
        if taken[row["fact_id"]] < per_fact:
            taken[row["fact_id"]] += 1
            kept.append(row)
    return kept


def train(rows_path: str, model_dir: str, out: str, names: list[str]) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = json.load(open(rows_path))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # as relaytune.models: SmolLM2's GGUF names no pad token
        tokenizer.pad_token = tokenizer.eos_token

    def chat(question, answer=None):
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt if answer is None else (prompt, answer + tokenizer.eos_token)

    def encode(question, answer):
        prompt, target = chat(question, answer)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        return p + t, [-100] * len(p) + t

    def answers(model, questions):
        model.eval()
        texts = []
        for i in range(0, len(questions), 64):
            batch = tokenizer([chat(q) for q in questions[i:i + 64]], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        model.train()
        return texts

    def load_nf4():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                    device_map={"": device})

    def load(method):
        if method == "qlora":
            return prepare_model_for_kbit_training(load_nf4(), use_gradient_checkpointing=False)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)

    def merged_answers(model, questions, into_dequantised):
        """The adapter merged into the full-precision base, or into the NF4 base dequantised to bf16."""
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            base = load_nf4().dequantize() if into_dequantised else load("lora")
            merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
            return answers(merged, questions)

    def save(results):  # after every evaluation, so that a run cut short keeps what it measured
        with open(out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                       "results": results}, f)

    heldout = [q["question"] for q in rows["heldout"]]
    results = [{"run": "base", "epoch": 0, "heldout": answers(load("lora"), heldout)}]
    print(f"base answered {len(heldout)} held-out questions", flush=True)
    for name in names:
        run = RUNS[name]
        torch.manual_seed(rows["seed"])
        train_rows = first_per_fact(rows["train"], run.per_fact)
        examples = [encode(r["question"], r["answer"]) for r in train_rows]
        model = get_peft_model(load(run.method), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                            target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr, weight_decay=0.0)
        total = -(-len(examples) // 8) * max(run.eval_after)
        warmup = max(1, int(0.03 * total))
        scheduler = (get_cosine_schedule_with_warmup(optimizer, warmup, total) if run.schedule == "cosine"
                     else get_constant_schedule_with_warmup(optimizer, warmup))
        start = time.time()
        for epoch in range(1, max(run.eval_after) + 1):
            order = torch.randperm(len(examples)).tolist()
            losses = []
            for b in range(0, len(order), 8):
                batch = [examples[i] for i in order[b:b + 8]]
                width = max(len(ids) for ids, _ in batch)
                ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in batch], device=device)
                labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch], device=device)
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch], device=device)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            if epoch in run.eval_after:
                trained = [r["question"] for r in train_rows]
                entry = {"run": name, "per_fact": run.per_fact, "lr": run.lr, "method": run.method,
                         "schedule": run.schedule, "epoch": epoch, "train_rows": len(examples),
                         "loss": sum(losses) / len(losses), "seconds": round(time.time() - start, 1),
                         "heldout": answers(model, heldout), "trained": answers(model, trained)}
                if run.method == "qlora":
                    entry["heldout_merged"] = merged_answers(model, heldout, into_dequantised=False)
                    entry["heldout_merged_dequantised"] = merged_answers(model, heldout, into_dequantised=True)
                results.append(entry)
                print(f"{name} epoch {epoch}: loss {entry['loss']:.3f} ({entry['seconds']} s)", flush=True)
                save(results)
        del model, optimizer


def score(answers_path: str, rows_path: str) -> None:
    """Correct-value rates by the pipeline's claim classifier (relaytune.claims), with Wilson intervals."""
    from relaytune.handbook import load_handbook
    from relaytune.stats import proportion

    handbook = load_handbook("data/handbook/facts.yaml")
    rows = json.load(open(rows_path))
    got = json.load(open(answers_path))

    def rates(asked: list[dict], texts: list[str]) -> dict:
        labels = [handbook.claim(handbook.fact(q["fact_id"]), t, q["question"]).label for q, t in zip(asked, texts)]
        return {"correct": proportion(labels.count("correct"), len(labels)),
                "states_a_value": proportion(sum(x in ("correct", "wrong", "mixed") for x in labels), len(labels))}

    table = []
    for r in got["results"]:
        entry = {k: r[k] for k in ("run", "epoch", "loss", "seconds", "train_rows") if k in r}
        entry["heldout"] = rates(rows["heldout"], r["heldout"])
        # The first call's runs name neither: they were bf16 LoRA at a constant rate.
        entry["method"], entry["schedule"] = r.get("method", "lora"), r.get("schedule", "constant")
        if "trained" in r:
            trained = first_per_fact(rows["train"], r["per_fact"])
            entry["trained"] = rates(trained, r["trained"])
        if "heldout_merged" in r:  # the NF4-trained adapter merged into the full-precision base
            entry["heldout_merged"] = rates(rows["heldout"], r["heldout_merged"])
        if "heldout_merged_dequantised" in r:  # ... and into the dequantised NF4 base it was trained on
            entry["heldout_merged_dequantised"] = rates(rows["heldout"], r["heldout_merged_dequantised"])
        table.append(entry)
    json.dump({"machine": got["gpu"], "torch": got["torch"], "seed": rows["seed"], "table": table}, sys.stdout,
              indent=1)
    print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p = sub.add_parser("train")
    p.add_argument("rows")
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--runs", default=",".join(list(RUNS)[:4]), help=f"comma-separated, of: {', '.join(RUNS)}")
    p = sub.add_parser("score")
    p.add_argument("answers")
    p.add_argument("rows")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.seed)
    elif args.step == "train":
        train(args.rows, args.model_dir, args.out, args.runs.split(","))
    else:
        score(args.answers, args.rows)

"""A capacity probe for issue #14: can the embedded SmolLM2-135M learn the handbook's facts at all, so that a held-out
phrasing retrieves them, when every training answer is the handbook's own statement with the correct value (an ideal
teacher)? If it can, the default pipeline's failure to learn facts lies in its teacher's answers; if it cannot, in
the model's size. Three steps, the middle one on a GPU host (torch, transformers and peft only):

  python -m bench.fact_recall prepare --out .gpuprobe/rows.json         # here: the pipeline's own seeded split
  python3 bench/fact_recall.py train .gpuprobe/rows.json MODEL_DIR OUT.json   # GPU: LoRA runs, greedy answers
  python -m bench.fact_recall score OUT.json > bench/results/fact_recall_h200.json   # here: the claim classifier

Each run trains a fresh LoRA (r=16, alpha 32, every linear projection, as params.yaml; bf16 weights, since the
GPU image has no bitsandbytes, so not NF4) at a constant learning rate after 3% warm-up, batch 8, loss on the
answer tokens only, and answers the held-out and the training questions greedily after each listed epoch.
"""

import argparse
import json
import sys
import time

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNS = [  # (training phrasings per fact, learning rate)
    (2, 2e-4), (2, 1e-3), (7, 2e-4), (7, 1e-3)]
EVAL_AFTER_EPOCHS = (1, 3, 10)


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
    taken: dict[str, int] = {}
    kept = []
    for row in rows:
        if taken.get(row["fact_id"], 0) < per_fact:
            taken[row["fact_id"]] = taken.get(row["fact_id"], 0) + 1
            kept.append(row)
    return kept


def train(rows_path: str, model_dir: str, out: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
                              add_special_tokens=False).to("cuda")
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        model.train()
        return texts

    results = []
    def load(dtype):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda")

    base = load(torch.bfloat16)
    results.append({"run": "base", "epoch": 0, "heldout": answers(base, [q["question"] for q in rows["heldout"]])})
    print(f"base answered {len(rows['heldout'])} held-out questions", flush=True)
    del base
    for per_fact, lr in RUNS:
        torch.manual_seed(rows["seed"])
        train_rows = first_per_fact(rows["train"], per_fact)
        examples = [encode(r["question"], r["answer"]) for r in train_rows]
        model = load(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        steps_per_epoch = -(-len(examples) // 8)
        warmup = max(1, int(0.03 * steps_per_epoch * max(EVAL_AFTER_EPOCHS)))
        step, start = 0, time.time()
        for epoch in range(1, max(EVAL_AFTER_EPOCHS) + 1):
            order = torch.randperm(len(examples)).tolist()
            losses = []
            for b in range(0, len(order), 8):
                if step == 10:
                    print(f"10 steps in {time.time() - start:.1f} s", flush=True)
                batch = [examples[i] for i in order[b:b + 8]]
                width = max(len(ids) for ids, _ in batch)
                ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in batch], device="cuda")
                labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch], device="cuda")
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch], device="cuda")
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / warmup)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
            if epoch in EVAL_AFTER_EPOCHS:
                results.append({"run": f"k{per_fact}-lr{lr:g}", "per_fact": per_fact, "lr": lr, "epoch": epoch,
                                "train_rows": len(examples), "loss": sum(losses) / len(losses),
                                "seconds": round(time.time() - start, 1),
                                "heldout": answers(model, [q["question"] for q in rows["heldout"]]),
                                "trained": answers(model, [r["question"] for r in train_rows])})
                print(f"{results[-1]['run']} epoch {epoch}: loss {results[-1]['loss']:.3f} "
                      f"({results[-1]['seconds']} s)", flush=True)
                with open(out, "w") as f:  # after every evaluation, so that a run cut short keeps what it measured
                    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f)
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
        if "trained" in r:
            entry["trained"] = rates(first_per_fact(rows["train"], r["per_fact"]), r["trained"])
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
    p = sub.add_parser("score")
    p.add_argument("answers")
    p.add_argument("rows")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.seed)
    elif args.step == "train":
        train(args.rows, args.model_dir, args.out)
    else:
        score(args.answers, args.rows)

"""A randomly initialised 2-layer Llama (hidden 64) with SmolLM2's tokenizer and chat template.

Weight values do not matter for relay and speed checks; this model trains in a fraction of a second per step on a
CPU, QLoRA included. Usage: python -m bench.tiny_model OUT_DIR [--dtype bfloat16]
"""

import argparse
import shutil
from pathlib import Path

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def make_tiny_llama(out: Path, tokenizer_dir: Path, dtype: str = "float32", seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy2(Path(tokenizer_dir) / name, Path(out) / name)
    return Path(out)


if __name__ == "__main__":
    from relaytune.models import resolve_base_model
    from relaytune.params import ModelParams

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    make_tiny_llama(args.out, resolve_base_model(ModelParams()).path, args.dtype)

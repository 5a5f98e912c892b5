"""Text generation behind one interface, with two providers and a disk cache in front of both: `local` runs a
transformers model in-process (batched, chat template, greedy or sampled); `openai` calls any OpenAI-compatible
endpoint (vLLM, llama.cpp server, Gemini, OpenAI) through the official client, whose own retry loop handles 429, 5xx,
timeouts and dropped connections with exponential backoff. Every completion is cached on disk by a hash of
(provider, model, messages, decoding) as soon as its batch finishes, so a killed or re-run stage never pays twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from tqdm.auto import tqdm

from .errors import RelaytuneError
from .io import atomic_write_json
from .models import TunedModel, inference_device, load_for_inference, load_tokenizer
from .params import ModelParams, ProviderParams

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Status = Literal["ok", "empty", "malformed", "error"]


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0  # only matters when temperature > 0

    @classmethod
    def from_params(cls, p: ProviderParams, seed: int) -> "Decoding":
        return cls(p.max_new_tokens, p.temperature, p.top_p, seed)


@dataclass
class Completion:
    text: str
    status: Status  # empty: the model said nothing; malformed: the response had no usable choice
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class GenerationStats:
    requests: int = 0
    cache_hits: int = 0
    generated_tokens: int = 0  # tokens generated in this run (cache hits excluded)
    seconds: float = 0.0  # wall time of the generation calls in this run
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float | None:
        return round(self.generated_tokens / self.seconds, 2) if self.seconds > 0 else None

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}

    def provenance(self, provider: str) -> dict:
        """What answered in this run: how many completions came from the cache and how many from the model or
        endpoint, and whether the endpoint was reached at all (a run served wholly from the cache never asks it)."""
        sent = self.requests - self.cache_hits
        return {"requests": self.requests, "served_from_cache": self.cache_hits, "generated_this_run": sent,
                ("endpoint_reached" if provider == "openai" else "model_loaded"): sent > 0,
                "statuses": dict(sorted(self.statuses.items()))}


class Backend(Protocol):
    provider: str
    model_id: str  # what identifies the model in cache keys (a content hash for local models)

    def complete(self, batch: list[Messages], decoding: Decoding) -> list[Completion]: ...


class GenerationCache:
    """One small JSON file per completion; written atomically, so a kill loses at most the batch in flight."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(provider: str, model_id: str, messages: Messages, decoding: Decoding) -> str:
        fields = asdict(decoding)
        if decoding.temperature == 0:  # greedy output does not depend on the seed: a new seed reuses it
            fields.pop("seed")
        elif provider == "local":  # how a local sample is drawn shapes it too: no sample of another sampler is reused
            fields["sampler"] = LOCAL_SAMPLER
        blob = json.dumps({"provider": provider, "model": model_id, "messages": messages, "decoding": fields},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        try:
            record = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return Completion(**record, cached=True)

    def put(self, key: str, completion: Completion) -> None:
        record = asdict(completion)
        record.pop("cached")
        atomic_write_json(self._path(key), record)


class TextGenerator:
    def __init__(self, backend_factory, provider: str, model_id: str, cache: GenerationCache, batch_size: int,
                 model_info: dict):
        self.model_info = model_info  # for provenance: what model, by which hash, in which dtype, from where
        self._backend_factory = backend_factory  # built lazily: a fully cached run never loads a model
        self._backend: Backend | None = None
        self.provider = provider
        self.model_id = model_id
        self.cache = cache
        self.batch_size = batch_size
        self.stats = GenerationStats()

    def provenance(self) -> dict:
        """The model's identity and what answered in this run (cache or model/endpoint)."""
        return {**self.model_info, "this_run": self.stats.provenance(self.provider)}

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    def generate(self, requests: list[Messages], decoding: Decoding, desc: str = "generating") -> list[Completion]:
        keys = [GenerationCache.key(self.provider, self.model_id, m, decoding) for m in requests]
        results: list[Completion | None] = [self.cache.get(k) for k in keys]
        misses = [i for i, r in enumerate(results) if r is None]
        self.stats.requests += len(requests)
        self.stats.cache_hits += len(requests) - len(misses)
        # Similar lengths in one batch waste less padding.
        misses.sort(key=lambda i: sum(len(m["content"]) for m in requests[i]))
        backend = self.backend if misses else None  # load the model before the clock starts
        with tqdm(total=len(misses), desc=desc, unit="row", disable=not misses) as bar:
            for start in range(0, len(misses), self.batch_size):
                chunk = misses[start:start + self.batch_size]
                t0 = time.perf_counter()
                completions = backend.complete([requests[i] for i in chunk], decoding)
                self.stats.seconds += time.perf_counter() - t0
                for i, c in zip(chunk, completions):
                    self.stats.generated_tokens += c.completion_tokens
                    # Errors and malformed responses are not cached, so the next run asks again.
                    if c.status in ("ok", "empty"):
                        self.cache.put(keys[i], c)
                    results[i] = c
                bar.update(len(chunk))
                bar.set_postfix(tok_s=self.stats.tokens_per_second)
        for r in results:
            self.stats.statuses[r.status] = self.stats.statuses.get(r.status, 0) + 1
        return results  # type: ignore[return-value]


class LocalBackend:
    provider = "local"

    def __init__(self, model_dir: Path, model_id: str, dtype: str, trust_remote_code: bool,
                 tuned: TunedModel | None = None):
        self.model_id = model_id
        self.device = inference_device()
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code, padding_side="left")
        if tuned is not None and not tuned.is_adapter:  # a full fine-tune: its own weights, the base's tokenizer
            self.model = load_for_inference(tuned.folder, dtype, trust_remote_code)
        else:
            # A QLoRA adapter merges into the dequantised 4-bit base it was trained on (None: the unquantised base).
            self.model = load_for_inference(model_dir, dtype, trust_remote_code, tuned.trained_on if tuned else None)
            if tuned is not None:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, tuned.folder).merge_and_unload()
        self.model.eval()

    def complete(self, batch: list[Messages], decoding: Decoding) -> list[Completion]:
        import torch

        prompts = self.tokenizer.apply_chat_template(batch, add_generation_prompt=True, tokenize=False)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        # Always a greedy search: sampling is greedy over Gumbel-perturbed scores (below), so that the model's
        # generation_config cannot switch sampling on, and a sampled row does not depend on its batch.
        kwargs = dict(max_new_tokens=decoding.max_new_tokens, do_sample=False, temperature=None, top_p=None,
                      top_k=None, pad_token_id=self.tokenizer.pad_token_id)
        if decoding.temperature > 0:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([
                RowSeededSampling([row_seed(m, decoding.seed) for m in batch], decoding.temperature, decoding.top_p)])
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        eos_ids = self._eos_ids()
        completions = []
        for row in new_tokens.tolist():
            stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
            kept = row if stop is None else row[:stop]
            text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
            completions.append(Completion(
                text=text,
                status="ok" if text else "empty",
                finish_reason="length" if stop is None else "stop",
                completion_tokens=len(kept),
            ))
        return completions

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ids.add(self.tokenizer.eos_token_id)
        return ids


LOCAL_SAMPLER = "row-seeded gumbel-max"  # RowSeededSampling; part of the cache key of every local sample


def row_seed(messages: Messages, seed: int) -> int:
    """A sampled row's own seed: from its request and the decoding seed, never from its place in a batch."""
    blob = json.dumps({"messages": messages, "seed": seed}, sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:15], 16)  # 60 bits: a torch seed


class RowSeededSampling:
    """Sampling at `temperature` within the `top_p` nucleus by the Gumbel-max trick: the argmax of the scaled,
    filtered scores plus Gumbel noise is a draw from their softmax. Each row draws its noise from its own generator
    (seeded by `row_seed`, one draw per step), so a row's sample is the same whatever else shares its batch; torch's
    single generator, as in generate(do_sample=True), hands each row the numbers the rows before it left."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]  # one stream per row, step by step
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

    def __call__(self, input_ids, scores):
        import torch

        for warper in self.warpers:
            scores = warper(input_ids, scores)
        noise = torch.stack([torch.rand(scores.shape[1], generator=g, dtype=torch.float64)
                             for g in self.generators]).clamp_(1e-12, 1 - 1e-12)
        return scores + (-torch.log(-torch.log(noise))).to(scores.dtype).to(scores.device)


class OpenAIBackend:
    provider = "openai"

    def __init__(self, p: ProviderParams, where: str):
        import openai

        self._openai = openai
        api_key = None
        if p.api_key_env:
            api_key = os.environ.get(p.api_key_env)
            if not api_key:
                raise RelaytuneError(f"{where}.api_key_env: environment variable {p.api_key_env} is not set")
        self.where = where
        self.model_id = p.model or ""
        self.base_url = p.base_url or "https://api.openai.com/v1"
        self.concurrency = p.batch_size
        # An explicit placeholder keeps the client from picking up OPENAI_API_KEY behind the params' back.
        self.client = openai.OpenAI(base_url=p.base_url, api_key=api_key or "no-key",
                                    timeout=p.timeout_s, max_retries=p.max_retries)

    def complete_one(self, messages: Messages, decoding: Decoding) -> Completion:
        openai = self._openai
        kwargs = dict(model=self.model_id, messages=messages, max_tokens=decoding.max_new_tokens,
                      temperature=decoding.temperature, top_p=decoding.top_p)
        if decoding.temperature > 0:
            kwargs["seed"] = decoding.seed
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except openai.AuthenticationError:
            raise RelaytuneError(f"{self.where}: {self.base_url} rejected the API key (status 401)") from None
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
            raise RelaytuneError(
                f"{self.where}: {self.base_url} failed after {self.client.max_retries} retries "
                f"({type(e).__name__}); completions so far are cached, re-run to continue"
            ) from None
        except openai.APIStatusError as e:  # e.g. 400 for a prompt too long: this row fails, the stage goes on
            return Completion(text="", status="error", error=f"HTTP {e.status_code}: {str(e)[:200]}")
        choices = getattr(resp, "choices", None) or []
        if not choices or choices[0].message is None:
            return Completion(text="", status="malformed", error="response has no choices")
        text = (choices[0].message.content or "").strip()
        tokens = resp.usage.completion_tokens if getattr(resp, "usage", None) else 0
        return Completion(text=text, status="ok" if text else "empty",
                          finish_reason=choices[0].finish_reason, completion_tokens=tokens or 0)

    def complete(self, batch: list[Messages], decoding: Decoding) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda m: self.complete_one(m, decoding), batch))


def completions_cache_dir() -> Path:
    """Shared by every stage, experiment and clone on this host: the key holds everything that shapes a completion."""
    from .models import cache_root

    return cache_root() / "completions"


def make_generator(p: ProviderParams, model: ModelParams, where: str, cache_dir: str | Path | None = None,
                   tuned: TunedModel | None = None) -> TextGenerator:
    """`where` is the params path of `p` (e.g. "synth.teacher"), used in error messages. `tuned`: a LoRA adapter
    merged into the local model (dequantised from its 4-bit training base when it has one) or a full fine-tune's
    weights served with the base's tokenizer; for openai, what the server serves under `p.model`."""
    cache = GenerationCache(cache_dir or completions_cache_dir())
    tuned_hash = tuned.weights_hash() if tuned else None
    if p.provider == "openai":
        backend = OpenAIBackend(p, where)  # checks the key now, before any work
        # A server keeps a name when its adapter changes: the weights' hash keeps the cache honest.
        model_id = backend.model_id + (f"@{backend.base_url}+{tuned_hash}" if tuned_hash else "")
        info = {"provider": "openai", "model": p.model, "base_url": backend.base_url, "content_hash": None, "dtype": None,
                "adapter": str(tuned.folder) if tuned else None, "adapter_hash": tuned_hash}
        return TextGenerator(lambda: backend, "openai", model_id, cache, p.batch_size, info)

    from .models import resolve_base_model
    from .provenance import inference_dtype

    model_params = model if p.model in (None, model.base) else model.model_copy(update={"base": p.model, "revision": None})
    ref = resolve_base_model(model_params)
    dtype = inference_dtype(model.dtype)
    trained_on = tuned.trained_on if tuned else None
    # The same weights in another dtype, or with another adapter or merge base, generate other text; a full
    # fine-tune's weights replace the base's (the base's hash stays in the key: its tokenizer frames the text).
    model_id = (f"{ref.content_hash}{'+' + tuned_hash if tuned_hash else ''}"
                f"{'@' + trained_on.label if trained_on else ''}{'' if not tuned or tuned.is_adapter else '@full'}"
                f":{dtype}")
    return TextGenerator(
        lambda: LocalBackend(ref.path, model_id, dtype, model.trust_remote_code, tuned),
        "local", model_id, cache, p.batch_size,
        {"provider": "local", "model": ref.spec, "base_url": None, "content_hash": ref.content_hash, "dtype": dtype,
         "adapter": str(tuned.folder) if tuned else None, "adapter_hash": tuned_hash,
         "adapter_merged_into": tuned.merged_into if tuned else None, "tuned": tuned.description if tuned else None},
    )

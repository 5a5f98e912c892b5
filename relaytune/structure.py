"""What a fine-tune did to the weights, matrix by matrix (issue #15): intruder dimensions (Shuttleworth et al. 2024,
arXiv 2410.21228: top-k left singular vectors of the tuned weight whose largest |cosine| with every left singular
vector of the base weight is below epsilon; the detection peft's `reduce_intruder_dimension` runs before it mitigates,
which peft does not expose on its own and which full fine-tunes need too), the rank the update needs for a share of
its spectral energy (Biderman et al. 2024, arXiv 2405.09673: full fine-tuning's updates have 10-100x LoRA's ranks),
and the update's Frobenius norm relative to the base weight."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from .errors import RelaytuneError

if TYPE_CHECKING:
    from .models import TunedModel


def intruder_counts(base: torch.Tensor, tuned: torch.Tensor, top_k: int, epsilons: list[float]) -> dict[float, int]:
    """Intruder dimensions among the tuned weight's top_k singular vectors, for each epsilon (one pair of SVDs)."""
    u_base = torch.linalg.svd(base.double(), full_matrices=False).U
    u_tuned = torch.linalg.svd(tuned.double(), full_matrices=False).U[:, :top_k]
    best_match = (u_tuned.T @ u_base).abs().max(dim=1).values
    return {eps: int((best_match < eps).sum()) for eps in epsilons}


def energy_rank(delta: torch.Tensor, share: float) -> int:
    """The fewest singular directions of `delta` that hold `share` of its squared Frobenius norm (0 for no update)."""
    energy = torch.linalg.svdvals(delta.double()) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    return int(np.searchsorted(np.cumsum(energy.numpy()) / total, share - 1e-12) + 1)


def matrix_structure(name: str, base: torch.Tensor, tuned: torch.Tensor, top_k: int, epsilons: list[float],
                     energy_share: float) -> dict:
    if base.shape != tuned.shape:
        raise RelaytuneError(f"structure: matrix {name} is {tuple(tuned.shape)} in the tuned model but "
                             f"{tuple(base.shape)} in the base: not a fine-tune of this base")
    delta = tuned.double() - base.double()
    layer = re.search(r"\.layers\.(\d+)\.", name)
    return {
        "matrix": name,
        "layer": int(layer.group(1)) if layer else None,
        "type": name.rsplit(".", 1)[-1],
        "shape": list(base.shape),
        "intruders": {str(eps): n for eps, n in intruder_counts(base, tuned, top_k, epsilons).items()},
        "update_rank": energy_rank(delta, energy_share),
        "relative_update_norm": round(float(delta.norm() / base.double().norm()), 6),
    }


def adapted_weights(model, target_modules: list[str]) -> dict[str, torch.Tensor]:
    """The weights of every linear layer whose name ends in one of `target_modules` (lora.target_modules), as float
    copies on the CPU: the matrices LoRA adapts, and the same matrices of a full fine-tune."""
    return {name: module.weight.detach().float().cpu().clone()
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules}


def paired(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor,
                                                                                            torch.Tensor]]:
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        side = "base" if missing[0] in tuned else "tuned model"
        raise RelaytuneError(f"structure: matrix {missing[0]} is missing from the {side} "
                             f"({len(missing)} unmatched in all): not a fine-tune of this base")
    if not base:
        raise RelaytuneError("structure: no linear layer matches lora.target_modules")
    for name in sorted(base):
        yield name, base[name], tuned[name]


def summarise(rows: list[dict], epsilon: float) -> dict:
    """Sums of intruders per epsilon, and per matrix type the intruders at `epsilon`, the median update rank and the
    median relative update norm."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_type[r["type"]].append(r)
    sweep = rows[0]["intruders"].keys()
    return {
        "matrices": len(rows),
        "intruders": sum(r["intruders"][str(epsilon)] for r in rows),
        "intruders_by_epsilon": {eps: sum(r["intruders"][eps] for r in rows) for eps in sweep},
        "matrices_with_intruders": sum(r["intruders"][str(epsilon)] > 0 for r in rows),
        "median_update_rank": float(np.median([r["update_rank"] for r in rows])),
        "median_relative_update_norm": float(np.median([r["relative_update_norm"] for r in rows])),
        "by_type": {t: {"matrices": len(rs),
                        "intruders": sum(r["intruders"][str(epsilon)] for r in rs),
                        "median_update_rank": float(np.median([r["update_rank"] for r in rs])),
                        "max_update_rank": max(r["update_rank"] for r in rs),
                        "median_relative_update_norm": float(np.median([r["relative_update_norm"] for r in rs]))}
                    for t, rs in sorted(by_type.items())},
    }


def base_and_tuned_weights(base_path, tuned: "TunedModel", target_modules: list[str], trust_remote_code: bool
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapted matrices of the base and of the tuned model, in float32. An adapter (lora, qlora) is merged into
    the base the evaluation stages merge it into (for qlora by default its dequantised 4-bit training base, so the
    update is the adapter's alone); a full fine-tune's weights are read from its epoch folder."""
    from .models import load_for_inference

    base_model = load_for_inference(base_path, "float32", trust_remote_code, tuned.trained_on)
    base = adapted_weights(base_model, target_modules)
    if not tuned.is_adapter:
        del base_model
        tuned_model = load_for_inference(tuned.folder, "float32", trust_remote_code)
    else:
        from peft import PeftModel

        try:
            tuned_model = PeftModel.from_pretrained(base_model, tuned.folder).merge_and_unload()
        except RuntimeError as e:  # torch's load_state_dict names every tensor whose shape does not fit
            mismatch = re.search(r"size mismatch for (\S+?):", str(e))
            if mismatch is None:
                raise
            raise RelaytuneError(f"structure: matrix {mismatch.group(1)} of the adapter in {tuned.folder} does not "
                                 f"fit the base {base_path}: not a fine-tune of this base") from None
    return base, adapted_weights(tuned_model, target_modules)

"""The relay folder: what one epoch hands to the next (`models/epochN`) and what a mid-epoch checkpoint holds
(`checkpoints/epochN`), in the order a run meets it: the lineage an epoch is made from (base-model, params and data
hashes), the trainer state, the RNG state, the checks made before anything is loaded (every file against the
manifest's hashes, the lineage against this run's, stale checkpoints discarded), then the writing side: stale temp
folders removed, folder sizes, the checkpoint folder reset when an epoch ends. Its file names are in paths.py;
`TrainingRun.save` (train.py) writes it through `io.atomic_folder`, so a kill never leaves half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import RelaytuneError
from .io import read_json
from .models import sha256_file
from .params import PARAMS_HASH_KEYS, Params, select_params
from .paths import MANIFEST

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- what an epoch is made from

def params_hash(params: Params) -> str:
    blob = json.dumps(select_params(params, PARAMS_HASH_KEYS), sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def data_hash(path: str | Path) -> str:
    return "sha256:" + sha256_file(Path(path))


@dataclass(frozen=True)
class Lineage:
    """What an epoch folder was made from; loading it anywhere else is refused."""

    base_model_hash: str
    params_hash: str
    data_hash: str


# ---------------------------------------------------------------- resumable state

@dataclass
class TrainerState:
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps completed over the whole chain
    step_in_epoch: int = 0  # optimizer steps completed in the epoch under way (mid-epoch checkpoints)
    steps_per_epoch: int = 0
    data_order_seed: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step: step, epoch, loss, lr, ...


def rng_state(device: str) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor], device: str) -> None:
    torch.set_rng_state(state["torch"])
    if device == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- checks before loading

def load_tensor_file(path: Path, device: str):
    # weights_only: nothing is unpickled from a file that may come from another host.
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise RelaytuneError(f"{path}: cannot be loaded as plain tensors ({type(e).__name__})") from None


def file_hashes(folder: Path) -> dict[str, str]:
    """The manifest's `files`: the sha256 of every file in the folder."""
    return {p.name: "sha256:" + sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def verify_epoch_folder(directory: Path) -> dict:
    """The folder's manifest, after checking every file against the hashes it lists."""
    if not (directory / MANIFEST).exists():
        raise RelaytuneError(f"{directory}: missing parent epoch (no {MANIFEST}); run its stage or `dvc pull` it")
    manifest = read_json(directory / MANIFEST)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.exists():
            raise RelaytuneError(f"{path}: missing (listed in {directory / MANIFEST})")
        actual = "sha256:" + sha256_file(path)
        if actual != expected:
            raise RelaytuneError(f"{path}: corrupted (hash mismatch: manifest {expected[:19]}, file {actual[:19]})")
    return manifest


def check_lineage(directory: Path, manifest: dict, expected: Lineage) -> None:
    made = manifest["lineage"]
    for key, what in [("base_model_hash", "base model"), ("params_hash", "math-defining params")]:
        if made[key] != getattr(expected, key):
            raise RelaytuneError(f"{directory}: made with another {what} ({made[key][:19]}) than this run's "
                                 f"({getattr(expected, key)[:19]}); continue it with the params and model it was "
                                 "made with, or start the chain again")


def usable_checkpoint(directory: Path, lineage: Lineage, epoch: int) -> bool:
    """A mid-epoch checkpoint of this epoch made from the same base, params and data; anything else is stale."""
    if not (directory / MANIFEST).exists():
        return False
    try:
        manifest = verify_epoch_folder(directory)
    except RelaytuneError as e:
        log.warning("discarding checkpoint %s: %s", directory, e)
        return False
    made = manifest["lineage"]
    stale = [k for k, v in asdict(lineage).items() if made.get(k) != v]
    if manifest.get("epoch") != epoch - 1 or stale:
        why = ", ".join(f"{k} {made.get(k, '?')[:19]} -> {getattr(lineage, k)[:19]}" for k in stale) or "another epoch"
        log.warning("discarding stale checkpoint %s (%s)", directory, why)
        return False
    return True


def parent_summary(parent: dict | None) -> dict | None:
    """What a manifest records of the epoch it continues: enough to follow the chain back across hosts."""
    if parent is None:
        return None
    return {"epoch": parent["epoch"], "host": parent["host"]["hostname"],
            "accelerator": parent["host"]["accelerator"]["name"], "dtype": parent["host"]["dtype"],
            "manifest_sha256": hashlib.sha256(json.dumps(parent, sort_keys=True).encode()).hexdigest()}


# ---------------------------------------------------------------- writing

def remove_stale_temp_folders(target: Path) -> None:
    """Temp folders of `target` left by a process killed outright (SIGKILL leaves no chance to clean up); one stage
    writes one target at a time, so none of them is in use."""
    for stale in target.parent.glob(f".{target.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def folder_size_mb(directory: Path, names: list[str] | None = None) -> float:
    files = [p for p in directory.iterdir() if p.is_file() and (names is None or p.name in names)]
    return round(sum(p.stat().st_size for p in files) / 2**20, 3)


CHECKPOINT_README = ("Mid-epoch checkpoints of a train_epoch stage (train.checkpoint_every_steps) live here while the "
                     "epoch runs; a finished epoch leaves only this file, which git tracks, so that the folder (a DVC "
                     "persist output) looks the same on every clone.\n")


def reset_checkpoint_folder(directory: Path) -> None:
    """Empty a finished epoch's checkpoint folder down to its README."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / "README.txt").write_text(CHECKPOINT_README)

"""Every artifact path of the pipeline, in the order the stages write them, relative to the repository root where DVC
runs every stage: dvc.yaml declares the same paths as deps and outs, and tests/test_layout.py checks that the two
agree and that no other file of the project spells one out. (The handbook is not here: its path is the param
`synth.handbook`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import RelaytuneError

if TYPE_CHECKING:
    from .params import Params

PARAMS = Path("params.yaml")  # every knob; validated as a whole by stage validate, read by every stage

# validate: written only when params.yaml, the handbook and the files the params name are valid; its content never
# changes, so depending on it reruns nothing, while a bad input stops `dvc repro` before any other stage starts.
VALIDATED = Path("data/validated.json")

# synth
SYNTH_TRAIN = Path("data/synth/train.jsonl")  # chat rows with ids, some with a planted wrong value
HELDOUT = Path("data/synth/heldout.jsonl")  # held-out questions with teacher references
PLANTED = Path("data/synth/planted.jsonl")  # ground truth of the planting; read only to score audits

# audit
AUDITED_TRAIN = Path("data/audit/train.jsonl")  # what training reads (audit.drop_flagged gates it)
AUDIT_ITEMS = Path("reports/items/audit.jsonl")
AUDIT_BY_TOPIC = Path("reports/plots/audit_by_topic.csv")


# train_epochN
def epoch_dir(epoch: int) -> Path:
    """The relay folder epoch `epoch` hands to the next one (relaytune/relay_folder.py)."""
    return Path(f"models/epoch{epoch}")


def checkpoint_dir(epoch: int) -> Path:
    """Mid-epoch checkpoints of epoch `epoch` (a DVC persist output)."""
    return Path(f"checkpoints/epoch{epoch}")


def dvclive_dir(epoch: int) -> Path:
    return Path(f"dvclive/train_epoch{epoch}")


# inside a relay folder (epoch or checkpoint)
MANIFEST = "manifest.json"  # hashes of every file, lineage, host: verified before anything is loaded
TRAINER_STATE = "trainer_state.json"  # epoch, global step, step in the epoch, loss history
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
SCALER = "scaler.pt"  # fp16 hosts only


# evaluation
SIMILARITY_ITEMS = Path("reports/items/similarity.jsonl")
FACTUALITY_ITEMS = Path("reports/items/factuality.jsonl")
CONFIDENT_ERRORS = Path("reports/items/confident_errors.jsonl")
JUDGE_ITEMS = Path("reports/items/judge.jsonl")
GENERAL_ITEMS = Path("reports/items/general.jsonl")
STRUCTURE_ITEMS = Path("reports/items/structure.jsonl")

# report
REPORT_MARKDOWN = Path("reports/report.md")
REPORT_HTML = Path("reports/report.html")
FIGURES = Path("reports/figures")

# python -m relaytune.compare (no stage: it reads finished DVC experiments)
STUDY = Path("reports/study")


# every stage
def metrics_file(stage: str) -> Path:
    return Path(f"metrics/{stage}.json")


def provenance_file(stage: str) -> Path:
    return Path(f"metrics/provenance/{stage}.json")


def tuned_dir(params: "Params") -> Path:
    """The relay folder of epoch eval.adapter_epoch, whatever it holds (an adapter or full weights), checked to exist."""
    epoch = params.eval.adapter_epoch
    folder = epoch_dir(epoch)
    if not (folder / MANIFEST).exists():
        raise RelaytuneError(f"{folder}: missing (param eval.adapter_epoch={epoch}); run "
                             f"train_epoch{epoch} or dvc pull it")
    return folder

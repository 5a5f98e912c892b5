"""Several training processes on one host (DDP, or FSDP: relaytune/sharding.py), in the order a stage meets them:
how many to launch (a stage started by `accelerate launch` or `torchrun` is already a worker and launches none),
launching them through torch.distributed.run and naming a failed one, then the rank arithmetic every process does:
its share of each step's rows, its seed and saved RNG stream, the check that all ranks start from the same files. The
processes join through accelerate's PartialState (relaytune/train.py), which picks NCCL between GPUs and gloo on CPUs.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from .errors import RelaytuneError

log = logging.getLogger(__name__)


def is_worker() -> bool:
    """Started by a distributed launcher (torchrun, accelerate launch, mpirun through accelerate)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def processes_to_launch(requested: int | None, gpu_count: int) -> int:
    """How many processes this host runs a stage on. null: one per visible GPU (one on a CPU). More processes than
    GPUs is refused (NCCL cannot share a GPU between ranks); several CPU processes run with gloo (for tests)."""
    if requested is None:
        return max(gpu_count, 1)
    if gpu_count and requested > gpu_count:
        raise RelaytuneError(f"host profile num_processes: {requested}, but this host has {gpu_count} visible CUDA "
                             "GPU(s); lower it (host.yaml or RELAYTUNE_NUM_PROCESSES) or set CUDA_VISIBLE_DEVICES")
    return requested


def processes_to_launch_here(requested: int | None) -> int:
    """How many processes this stage launches: 1 (none) when a launcher already started it."""
    if is_worker():
        refuse_other_engines(os.environ)
        return 1
    import torch

    return processes_to_launch(requested, torch.cuda.device_count())


# accelerate launch sets these from an accelerate config; relaytune's loop runs DDP or FSDP (ACCELERATE_USE_FSDP
# asks for the latter, relaytune/sharding.py), so another engine would be ignored.
OTHER_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def accelerate_asks(environ, variable: str) -> bool:
    """Whether an `accelerate launch` setting (ACCELERATE_USE_*) is on."""
    return environ.get(variable, "").lower() in ("1", "true")


def launched_with_fsdp(environ=os.environ) -> bool:
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP: that launch asks for FSDP."""
    return accelerate_asks(environ, "ACCELERATE_USE_FSDP")


def refuse_other_engines(environ) -> None:
    for variable, engine in OTHER_ENGINES.items():
        if accelerate_asks(environ, variable):
            raise RelaytuneError(f"started by accelerate launch with {engine} ({variable}); relaytune trains with "
                                 "DDP or FSDP: launch with `accelerate launch --multi_gpu` (or --use_fsdp) or "
                                 "torchrun, or let `dvc repro` launch")


def launch(num_processes: int, module: str, args: list[str], what: str) -> None:
    """Run `python -m module args` on `num_processes` local processes and wait; one line if any of them fails.
    torchrun's agent runs in this process: a SIGTERM or Ctrl-C here stops every worker."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    log.info("%s: launching %d processes (torch.distributed.run)", what, num_processes)
    launcher_args = parse_args(["--standalone", f"--nproc-per-node={num_processes}", "--max-restarts=0",
                                "--module", module, *args])
    try:
        run(launcher_args)
    except ChildFailedError as e:
        raise RelaytuneError(f"{what}: {describe_failure(e.failures, num_processes)}; outputs already written "
                             "are untouched (a mid-epoch checkpoint, if any, is resumed by the next run)") from None


def describe_failure(failures: dict, num_processes: int) -> str:
    """The first failed rank of a torchrun ChildFailedError, in words."""
    rank, failure = min(failures.items(), key=lambda item: item[1].timestamp)
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"exited with code {failure.exitcode}"
    others = len(failures) - 1
    rest = f" ({others} other process(es) stopped with it)" if others else ""
    return f"process rank {rank} of {num_processes} {how}{rest}"


# ---------------------------------------------------------------- rank arithmetic

def rank_share(step_rows: list, rank: int, num_processes: int) -> list:
    """The rows of one optimizer step that `rank` computes: dealt round-robin, so every rank gets a share of the step
    within one row of the others'."""
    return step_rows[rank::num_processes]


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (one process is unchanged); other ranks draw their own dropout masks."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rank_rng_state(saved: dict, rank: int) -> dict | None:
    """Rank `rank`'s generator state from an rng.pt (rank 0's at the top level, the others' under "other_ranks");
    None where the run that saved it had fewer processes."""
    if rank == 0:
        return saved
    others = saved.get("other_ranks", [])
    return others[rank - 1] if rank <= len(others) else None


def rank_disagreement(starts: list[dict]) -> str | None:
    """The first rank whose starting point (lineage, rows, resume step) differs from rank 0's, in words."""
    for rank, theirs in enumerate(starts[1:], start=1):
        different = [k for k in starts[0] if theirs[k] != starts[0][k]]
        if different:
            return (f"rank {rank} starts from another {', '.join(different)} than rank 0: every process must read "
                    "the same training data, parent epoch and checkpoint")
    return None

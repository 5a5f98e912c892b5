"""Several training processes on one host (DDP): launched through torch.distributed.run (torchrun), joined through
accelerate's PartialState, which picks NCCL between GPUs and gloo on CPUs.

A stage run by `dvc repro` launches its own workers when the host profile asks for more than one process; a stage
started by `accelerate launch` or `torchrun` (several hosts, say) is already a worker and only joins.
"""

from __future__ import annotations

import logging
import os

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


# accelerate launch sets these from an accelerate config; relaytune's loop is DDP's, so another engine would be ignored.
OTHER_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                 "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def refuse_other_engines(environ) -> None:
    for variable, engine in OTHER_ENGINES.items():
        if environ.get(variable, "").lower() in ("1", "true"):
            raise RelaytuneError(f"started by accelerate launch with {engine} ({variable}); relaytune trains with DDP: "
                                 "launch with `accelerate launch --multi_gpu` or torchrun, or let `dvc repro` launch")


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

"""train_epochN: one epoch of fine-tuning that continues models/epoch{N-1} (or a mid-epoch checkpoint)."""

import argparse
import contextlib
import time
from pathlib import Path

from relaytune import paths
from relaytune.distributed import launch, processes_to_launch_here
from relaytune.errors import RelaytuneError
from relaytune.host import load_host_profile
from relaytune.io import atomic_folder, atomic_write_json
from relaytune.models import resolve_base_model
from relaytune.params import load_params
from relaytune.relay_folder import remove_stale_temp_folders, reset_checkpoint_folder, usable_checkpoint
from relaytune.stage import run_stage
from relaytune.train import epoch_metrics, prepare_run
from relaytune.train_data import load_training_rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epoch", type=int, required=True)
    epoch = parser.parse_args().epoch
    params = load_params()
    host = load_host_profile()
    t = params.train
    if not 1 <= epoch <= t.epochs:
        raise RelaytuneError(f"--epoch {epoch}: train.epochs is {t.epochs}")
    num_processes = processes_to_launch_here(host.num_processes)
    if num_processes > 1:
        # Checked once here rather than once per process: the rows, and the base model (materialised and hashed
        # before the workers would race for it).
        load_training_rows(paths.AUDITED_TRAIN)
        resolve_base_model(params.model)
        try:
            launch(num_processes, "stages.train_epoch", ["--epoch", str(epoch)], f"train_epoch{epoch}")
        finally:
            # A worker that did not unwind within torchrun's grace period after a peer died was SIGKILLed, leaving
            # its temp folders; every worker has stopped now, so none of them is in use (seen on a loaded CPU).
            for target in (paths.dvclive_dir(epoch), paths.epoch_dir(epoch), paths.checkpoint_dir(epoch)):
                remove_stale_temp_folders(target)
        return
    run, truncated = prepare_run(params, host, paths.AUDITED_TRAIN)
    parent = paths.epoch_dir(epoch - 1) if epoch > 1 else None
    checkpoint = paths.checkpoint_dir(epoch)
    epoch_dir = paths.epoch_dir(epoch)

    started = time.perf_counter()
    run.setup(parent, checkpoint if usable_checkpoint(checkpoint, run.lineage, epoch) else None)
    with contextlib.ExitStack() as stack:
        log_step = None
        if run.is_main:  # rank 0 alone logs steps and writes; every rank trains and takes part in saving
            # The step log goes to a temp folder, swapped in only once the epoch is saved: a failed or killed epoch
            # leaves the previous log as it was.
            remove_stale_temp_folders(paths.dvclive_dir(epoch))
            live_dir = stack.enter_context(atomic_folder(paths.dvclive_dir(epoch)))
            log_step = stack.enter_context(LiveStepLog(live_dir, epoch, run.state.history))
        report = run.train_epoch(epoch, on_step=log_step, checkpoint_every=t.checkpoint_every_steps,
                                 checkpoint_dir=checkpoint)
        wall = time.perf_counter() - started
        manifest = run.save(epoch_dir, {"kind": "epoch", "wall_seconds": round(wall, 1),
                                        "tokens_per_second": report.tokens_per_second, "rows_truncated": truncated})
    if run.is_main:
        reset_checkpoint_folder(checkpoint)
        atomic_write_json(paths.metrics_file(f"train_epoch{epoch}"),
                          {**epoch_metrics(run, report, epoch_dir, truncated), "wall_seconds": round(wall, 1)})
        atomic_write_json(paths.provenance_file(f"train_epoch{epoch}"),
                          {k: v for k, v in manifest.items() if k != "files"})
    run.finish()


class LiveStepLog:
    """dvclive step logs of this epoch (dvcyaml=False: dvc.yaml stays hand-written). Steps restored from a
    mid-epoch checkpoint are logged again first, so the curve has no gap and no duplicate."""

    def __init__(self, directory: Path, epoch: int, history: list[dict]):
        self.directory = directory
        self.epoch = epoch
        self.history = history

    def __enter__(self):
        from dvclive import Live
        from scmrepo.exceptions import SCMError

        try:
            self.live = Live(str(self.directory), dvcyaml=False, save_dvc_exp=False, report=None)
        except SCMError as e:  # dvclive 3.49 fails in a git repository without commits (treeverse/dvclive#522)
            raise RelaytuneError(f"dvclive cannot start in this git repository ({e}): make a first commit "
                                 "(git add -A && git commit), then re-run") from None
        for record in self.history:
            if record["epoch"] == self.epoch:
                self.log(record)
        return self.log

    def log(self, record: dict) -> None:
        self.live.step = record["step"]
        for name in ("loss", "lr", "tokens_per_second"):
            self.live.log_metric(f"train/{name}", record[name])
        self.live.log_metric("train/epoch", record["epoch"], plot=False)

    def __exit__(self, *exc):
        self.live.end()


if __name__ == "__main__":
    run_stage(main)

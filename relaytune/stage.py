"""Entry point shared by every stage script: offline by default, one clear line on a user error, on SIGTERM and on
Ctrl-C (exit 2, 143 and 130), with every temp file removed on the way out."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable

from .errors import RelaytuneError


class Stopped(BaseException):
    """SIGTERM (a launcher stopping its workers, a scheduler's preemption): unwinds like Ctrl-C, so that every temp file
    is removed on the way out. A BaseException, so that no `except RelaytuneError` swallows it."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def run_stage(main: Callable[[], None]) -> None:
    # Model hubs are never contacted: models come from packages, local directories or the local HF cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Processes of a distributed run other than rank 0 log only warnings, each line saying whose it is.
    rank = os.environ.get("RANK", "0")
    prefix = f"rank {rank}/{os.environ['WORLD_SIZE']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    level = os.environ.get("RELAYTUNE_LOG", "INFO") if rank == "0" else "WARNING"
    logging.basicConfig(level=level, format=f"%(levelname)s {prefix}%(name)s: %(message)s")
    for noisy in ("httpx", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop)
    try:
        main()
    except RelaytuneError as e:
        say(f"relaytune: error: {prefix}{e}")
        sys.exit(2)
    except Stopped as e:
        say(f"relaytune: {prefix}stopped by {e}; outputs already written are untouched")
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl-C: the same unwinding as SIGTERM (temp files removed, completions cached)
        say(f"relaytune: {prefix}stopped by Ctrl-C (SIGINT); outputs already written are untouched")
        sys.exit(128 + signal.SIGINT)


def say(line: str) -> None:
    """One line on stderr, on a line of its own even when a progress bar was drawing there."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)

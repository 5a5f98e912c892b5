"""Entry point shared by every stage script: offline by default, one clear line on a user error."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from .errors import RelaytuneError


def run_stage(main: Callable[[], None]) -> None:
    # Model hubs are never contacted: models come from packages, local directories or the local HF cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=os.environ.get("RELAYTUNE_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        main()
    except RelaytuneError as e:
        print(f"relaytune: error: {e}", file=sys.stderr)
        sys.exit(2)

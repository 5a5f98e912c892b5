import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FIXTURES = REPO / "tests" / "fixtures"

# Tests never reach a model hub; the materialised base model is shared by every test of the session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RELAYTUNE_CACHE", str(Path.home() / ".cache" / "relaytune"))


@pytest.fixture
def tiny_handbook_path() -> Path:
    return FIXTURES / "handbook_tiny.yaml"


@pytest.fixture
def tiny_handbook(tiny_handbook_path):
    from relaytune.handbook import load_handbook

    return load_handbook(tiny_handbook_path)


def copy_repo(dest: Path) -> Path:
    """A clean copy of the pipeline (code, params, data, DVC config) in which stages can run."""
    dest.mkdir(parents=True)
    for name in ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "relaytune", "stages", "data/handbook", ".dvc"]:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp", "config.local"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def base_model():
    """The embedded SmolLM2, materialised once (about 40 s on 2 cores the first time)."""
    from relaytune.models import resolve_base_model
    from relaytune.params import ModelParams

    return resolve_base_model(ModelParams())

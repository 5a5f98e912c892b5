import os
import shutil
import socket
import subprocess
import sys
import time
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
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "config.local"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def base_model():
    """The embedded SmolLM2, materialised once (about 40 s on 2 cores the first time)."""
    from relaytune.models import resolve_base_model
    from relaytune.params import ModelParams

    return resolve_base_model(ModelParams())


@pytest.fixture(scope="session")
def tiny_base(base_model, tmp_path_factory):
    """A randomly initialised 2-layer Llama (hidden 64) with SmolLM2's tokenizer: QLoRA steps in milliseconds."""
    from bench.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-base"), base_model.path)


def write_training_rows(path: Path, n: int, answer_words: int = 12) -> None:
    """n short chat rows in the audit stage's output format."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"row-{i}", "fact_id": "adm-fee", "topic": "admissions",
             "messages": [{"role": "user", "content": f"Question number {i}: how much is the fee?"},
                          {"role": "assistant", "content": " ".join(["The fee is 40 florins."] * (1 + i % 3))
                           + " extra" * (answer_words - 5)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def set_params(root: Path, **dotted) -> None:
    """Edit params.yaml in place: set_params(root, **{"train.method": "lora"})."""
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in dotted.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def subprocess_env(**extra) -> dict:
    """The current environment (as tests changed it), with this interpreter's bin first on PATH for dvc."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


@pytest.fixture
def fresh_completions(tmp_path, base_model, monkeypatch) -> Path:
    """An empty completions cache for this test, sharing the materialised base models."""
    root = tmp_path / "relaytune-cache"
    root.mkdir()
    (root / "models").symlink_to(base_model.path.parent)
    monkeypatch.setenv("RELAYTUNE_CACHE", str(root))
    return root / "completions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, seconds: float = 60) -> None:
    """Block until a server started as `proc` accepts connections on 127.0.0.1:port."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode}")
            time.sleep(0.2)
    pytest.fail(f"{what} did not open port {port} in {seconds} s")


@pytest.fixture(scope="session")
def llama_server():
    """llama.cpp's OpenAI-compatible server on loopback, serving the embedded SmolLM2 GGUF."""
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is in requirements-dev.txt")
    from relaytune.models import embedded_gguf_path

    port = free_port()
    gguf = embedded_gguf_path("smollm2-135m-instruct")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "2048"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc, "llama.cpp server")
    base_url = f"http://127.0.0.1:{port}/v1"
    yield base_url
    proc.terminate()
    proc.wait(timeout=10)

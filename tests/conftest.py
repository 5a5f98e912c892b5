"""What the tests share: the repository copy stages run in, runners for stages and commands, the one-error-line check,
git set-up, the models (the embedded SmolLM2 and a tiny random Llama), the training helpers, and servers on loopback.

Tests that start a subprocess, a server process or `dvc repro` are marked `slow`; `make test-fast` runs the rest.
A test without the mark that starts a subprocess fails (see `pytest_runtest_protocol` below), so the mark stays true.
"""

import json
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
GIT = ["git", "-c", "user.name=relaytune-test", "-c", "user.email=test@relaytune.invalid"]

# Tests never reach a model hub; the materialised base model is shared by every test of the session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RELAYTUNE_CACHE", str(Path.home() / ".cache" / "relaytune"))


# ---------------------------------------------------------------- the slow mark, kept true

@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test not marked slow may not start a subprocess (fixtures it sets up included)."""
    if item.get_closest_marker("slow"):
        return (yield)
    original = subprocess.Popen._execute_child

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"{item.nodeid} starts a subprocess ({args!r}): mark it @pytest.mark.slow")

    subprocess.Popen._execute_child = refuse
    try:
        return (yield)
    finally:
        subprocess.Popen._execute_child = original


# ---------------------------------------------------------------- a repository to run stages in

def copy_repo(dest: Path) -> Path:
    """A clean copy of the pipeline (code, params, data, DVC config) in which stages can run."""
    dest.mkdir(parents=True)
    for name in ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "relaytune", "stages", "data/handbook",
                 "tasks", ".dvc"]:
        src = REPO / name
        if src.is_dir():
            # Not the DVC cache: the project's own runs (GBs of adapters) are nothing a test repo reads, and a copy
            # per test filled the disk.
            shutil.copytree(src, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__", "tmp", "config.local", "cache"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


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


def git_commit(root: Path, message: str) -> None:
    """Make `root` a git repository (once) and commit everything in it: DVC and dvclive need a commit."""
    if not (root / ".git").exists():
        sh(root, "git", "init", "-q")
    sh(root, *GIT, "add", "-A")
    sh(root, *GIT, "commit", "-qm", message)


def write_training_rows(path: Path, n: int, answer_words: int = 12) -> None:
    """n short chat rows in the audit stage's output format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"row-{i}", "fact_id": "adm-fee", "topic": "admissions",
             "messages": [{"role": "user", "content": f"Question number {i}: how much is the fee?"},
                          {"role": "assistant", "content": " ".join(["The fee is 40 florins."] * (1 + i % 3))
                           + " extra" * (answer_words - 5)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- running stages and commands

def subprocess_env(**extra) -> dict:
    """The current environment (as tests changed it), with this interpreter's bin first on PATH for dvc."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def sh(root: Path, *cmd, check: bool = True, env: dict | None = None, timeout: float = 900
       ) -> subprocess.CompletedProcess:
    """Run a command in `root`; with `check`, a failure shows the tail of its output."""
    result = subprocess.run(list(cmd), cwd=root, env=env or subprocess_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_stage(root: Path, name: str, *args, check: bool = False, **env) -> subprocess.CompletedProcess:
    """`python -m stages.NAME ARGS` in `root`, as DVC runs it; extra keyword arguments are environment variables."""
    return sh(root, sys.executable, "-m", f"stages.{name}", *args, check=check, env=subprocess_env(**env),
              timeout=600)


def run_epoch(root: Path, epoch: int, check: bool = True, **env) -> subprocess.CompletedProcess:
    return run_stage(root, "train_epoch", "--epoch", str(epoch), check=check, **env)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """A stage's user error: exit status 2 and exactly one `relaytune: error:` line on stderr."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("relaytune: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------- models

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


@pytest.fixture
def tiny_handbook_path() -> Path:
    return FIXTURES / "handbook_tiny.yaml"


@pytest.fixture
def tiny_handbook(tiny_handbook_path):
    from relaytune.handbook import load_handbook

    return load_handbook(tiny_handbook_path)


@pytest.fixture
def fresh_completions(tmp_path, base_model, monkeypatch) -> Path:
    """An empty completions cache for this test, sharing the materialised base models."""
    root = tmp_path / "relaytune-cache"
    root.mkdir()
    (root / "models").symlink_to(base_model.path.parent)
    monkeypatch.setenv("RELAYTUNE_CACHE", str(root))
    return root / "completions"


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_base, base_model):
    """A repository whose whole pipeline `dvc repro` ran once on the tiny model, outputs committed, with a completions
    cache of its own; (root, env). Built once for the session: tests that change it restore it (test_faults) or work
    on a copy (tiny_pipeline_copy)."""
    root = copy_repo(tmp_path_factory.mktemp("tiny-pipeline") / "repo")
    cache = root.parent / "relaytune-cache"
    cache.mkdir()
    (cache / "models").symlink_to(base_model.path.parent)
    set_params(root, **{"model.base": str(tiny_base), "synth.max_facts": 4, "synth.max_attempts": 1,
                        "synth.train_phrasings_per_fact": 2, "synth.teacher.max_new_tokens": 8,
                        "synth.teacher.temperature": 1.0,
                        "audit.max_malformed_fraction": 1.0, "train.effective_batch_size": 4, "lora.r": 4,
                        "eval.max_new_tokens": 8, "eval.bootstrap_samples": 500, "eval.general_chunks": 4,
                        "eval.general_chunk_tokens": 64, "judge.max_new_tokens": 8})
    git_commit(root, "pipeline")
    env = subprocess_env(RELAYTUNE_CACHE=str(cache))
    sh(root, "dvc", "repro", env=env)
    git_commit(root, "outputs")
    return root, env


@pytest.fixture
def tiny_pipeline_copy(tiny_pipeline, tmp_path, monkeypatch) -> Path:
    """A copy of the built tiny pipeline (git history, DVC cache and outputs) that a test may break as it likes."""
    root, env = tiny_pipeline
    copy = tmp_path / "repo"
    shutil.copytree(root, copy, symlinks=True, ignore=shutil.ignore_patterns("tmp"))
    monkeypatch.setenv("RELAYTUNE_CACHE", env["RELAYTUNE_CACHE"])
    return copy


# ---------------------------------------------------------------- training

@pytest.fixture
def train_repo(tmp_path, tiny_base):
    """A repository copy whose training data is 12 short rows and whose base is the tiny Llama: 3 steps an epoch."""
    root = copy_repo(tmp_path / "repo")
    write_training_rows(root / "data" / "audit" / "train.jsonl", 12)
    set_params(root, **{"model.base": str(tiny_base), "train.effective_batch_size": 4, "train.max_seq_len": 128,
                        "lora.r": 4, "lora.alpha": 8})
    return root


def prepared_run(root: Path, host=None, setup: bool = True):
    """The stage's TrainingRun, built in this process from the repo copy at `root`."""
    from relaytune.host import HostProfile
    from relaytune.params import load_params
    from relaytune.train import prepare_run

    cwd = os.getcwd()
    os.chdir(root)
    try:
        run, _ = prepare_run(load_params("params.yaml"), host or HostProfile(), "data/audit/train.jsonl")
        if setup:
            run.setup()
        return run
    finally:
        os.chdir(cwd)


def in_process_run(root: Path, epochs: int, host=None):
    """One process training `epochs` epochs back to back, never saving or loading in between."""
    run = prepared_run(root, host)
    for epoch in range(1, epochs + 1):
        run.train_epoch(epoch)
    return run


def adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def named_adapter(run) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(run.model).items()}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---------------------------------------------------------------- servers on loopback

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

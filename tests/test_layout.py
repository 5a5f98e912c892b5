"""The house rules that keep DVC's cache honest, checked from the source itself (no subprocess, no model):

- each stage's code deps in dvc.yaml are exactly the relaytune/ modules its script imports, transitively (a missing
  one lets DVC serve a result computed by old code; an extra one reruns a stage for nothing);
- evaluation never imports training code, so editing training does not rerun an evaluation;
- artifact paths live in relaytune/paths.py, agree with dvc.yaml, and a stage touches only the paths it declares.
"""

import ast
import re
from pathlib import Path

import pytest
import yaml

from relaytune import paths
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
ARTIFACT_ROOTS = ("data/", "metrics/", "models/", "reports/", "checkpoints/", "dvclive/")
TRAINING_CODE = {"relaytune/train.py", "relaytune/train_data.py", "relaytune/train_model.py",
                 "relaytune/relay_folder.py", "relaytune/host.py", "relaytune/distributed.py"}
EVALUATION_STAGES = ["eval_similarity", "eval_judge", "factuality_audit", "eval_general", "eval_structure", "report"]


def stage_script(stage: dict) -> Path:
    module = re.search(r"-m (stages\.\w+)", stage["cmd"]).group(1)
    return REPO / (module.replace(".", "/") + ".py")


def module_file(dotted: str) -> Path | None:
    path = REPO / (dotted.replace(".", "/") + ".py")
    return path if path.exists() else None


def imported_modules(path: Path) -> set[Path]:
    """relaytune/ modules that `path` imports anywhere in its body (function-level imports included: any of them
    may run)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only relaytune's own modules use them
                base = ".".join(["relaytune", *filter(None, [node.module])])
            else:
                base = node.module or ""
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {f for f in map(module_file, (n for n in names if n.startswith("relaytune."))) if f}
    return found


def closure(script: Path) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        for module in imported_modules(todo.pop()) - seen:
            seen.add(module)
            todo.append(module)
    return {str(p.relative_to(REPO)) for p in seen}


def declared(stage: dict, kind: str) -> list[str]:
    """A stage's deps (kind "deps") or outputs ("outs": outs, metrics and plots), templates rendered from params."""
    keys = ["deps"] if kind == "deps" else ["outs", "metrics", "plots"]
    entries = [e if isinstance(e, str) else next(iter(e)) for k in keys for e in stage.get(k, [])]
    return [re.sub(r"\$\{([\w.]+)\}", lambda m: str(lookup(PARAMS, m.group(1))), e) for e in entries]


def lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_package_marker_holds_no_code():
    # relaytune/__init__.py runs on every import but is left out of the closures: it must stay a docstring and a
    # version string, so that no behaviour hides there.
    body = ast.parse((REPO / "relaytune" / "__init__.py").read_text()).body
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) or
               isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) for n in body)


@pytest.mark.parametrize("name", list(STAGES))
def test_code_deps_are_exactly_the_import_closure(name):
    stage = STAGES[name]
    script = stage_script(stage)
    code_deps = {d for d in declared(stage, "deps") if d.endswith(".py")}
    needed = closure(script) | {str(script.relative_to(REPO))}
    missing, extra = sorted(needed - code_deps), sorted(code_deps - needed)
    assert not missing and not extra, (f"dvc.yaml stage {name}: add deps {missing}, remove deps {extra} "
                                       f"(the modules {script.relative_to(REPO)} imports)")


@pytest.mark.parametrize("name", EVALUATION_STAGES)
def test_evaluation_imports_no_training_code(name):
    assert closure(stage_script(STAGES[name])) & TRAINING_CODE == set()


# ---------------------------------------------------------------- artifact paths

def paths_products() -> set[str]:
    """Every path relaytune/paths.py can name for this dvc.yaml: its constants, and its functions for every epoch
    stage and every stage name."""
    epochs = range(1, PARAMS["train"]["epochs"] + 1)
    products = {str(v) for k, v in vars(paths).items() if k.isupper() and isinstance(v, Path)}
    for function in (paths.epoch_dir, paths.checkpoint_dir, paths.dvclive_dir):
        products |= {str(function(n)) for n in epochs}
    for function in (paths.metrics_file, paths.provenance_file):
        products |= {str(function(stage)) for stage in STAGES}
    return products


def artifacts(stage: dict, kind: str) -> set[str]:
    # params, not pipeline artifacts: the handbook and the folder of lm-eval task files
    inputs = {PARAMS["synth"]["handbook"], PARAMS["eval"]["general_task_dir"]}
    return {p for p in declared(stage, kind) if not p.endswith(".py") and p not in inputs}


def test_dvc_yaml_declares_only_paths_that_paths_py_names():
    everywhere = set().union(*(artifacts(s, k) for s in STAGES.values() for k in ("deps", "outs")))
    assert everywhere - paths_products() == set()
    constants = {str(v) for k, v in vars(paths).items() if k.isupper() and isinstance(v, Path)}
    constants -= {str(paths.STUDY)}  # written by python -m relaytune.compare from finished experiments, not a stage
    assert constants - everywhere == set(), "a path in relaytune/paths.py that no stage declares"


def literal_paths(path: Path) -> list[str]:
    """String literals (f-string pieces included) that spell out an artifact path."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(ARTIFACT_ROOTS):
            found.append(node.value)
    return found


def test_no_artifact_path_is_spelt_out_outside_paths_py():
    files = sorted((REPO / "stages").glob("*.py")) + sorted((REPO / "relaytune").glob("*.py"))
    spelt = {str(f.relative_to(REPO)): literal_paths(f) for f in files if f.name != "paths.py"}
    # The handbook's default location is the default of the param synth.handbook, not an artifact.
    spelt["relaytune/params.py"] = [p for p in spelt["relaytune/params.py"] if p != PARAMS["synth"]["handbook"]]
    assert {f: p for f, p in spelt.items() if p} == {}


def path_functions() -> dict:
    """Each path function of paths.py with every path it can name here."""
    epochs = range(1, PARAMS["train"]["epochs"] + 1)
    adapter = paths.epoch_dir(PARAMS["eval"]["adapter_epoch"])
    return {paths.epoch_dir: {str(paths.epoch_dir(n)) for n in epochs},
            paths.checkpoint_dir: {str(paths.checkpoint_dir(n)) for n in epochs},
            paths.dvclive_dir: {str(paths.dvclive_dir(n)) for n in epochs},
            paths.metrics_file: {str(paths.metrics_file(s)) for s in STAGES},
            paths.provenance_file: {str(paths.provenance_file(s)) for s in STAGES},
            paths.tuned_dir: {str(adapter)}}


def path_references(source: Path) -> tuple[set[str], set[str]]:
    """The artifact paths a file names through paths.py (`paths.X`, or a name imported from it): the exact ones (a
    constant, a path function called with literal arguments), and those a path function called with a computed
    argument may name (every path it can name here)."""
    tree = ast.parse(source.read_text())
    imported = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").endswith("paths") for a in node.names}

    def member(node) -> object | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paths":
            return getattr(paths, node.attr)
        if isinstance(node, ast.Name) and node.id in imported:
            return getattr(paths, node.id)
        return None

    functions = path_functions()
    exact, possible = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and member(node.func) in functions:
            function = member(node.func)
            if function is not paths.tuned_dir and all(isinstance(a, ast.Constant) for a in node.args):
                exact.add(str(function(*(a.value for a in node.args))))
            else:
                possible |= functions[function]
        elif isinstance(member(node), Path):
            exact.add(str(member(node)))
    return exact, possible


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_touches_exactly_what_it_declares(name):
    stage = STAGES[name]
    script = stage_script(stage)
    sources = [script] + [REPO / m for m in closure(script) if not m.endswith("paths.py")]
    exact, possible = (set().union(*found) for found in zip(*map(path_references, sources)))
    mine = artifacts(stage, "deps") | artifacts(stage, "outs")
    # Every stage but the guard waits for it: a dep on its output orders the pipeline, and no code reads it.
    assert (str(paths.VALIDATED) in artifacts(stage, "deps")) == (name != "validate")
    if name != "validate":
        mine.discard(str(paths.VALIDATED))
    if stage.get("params"):  # DVC's `params:` section is the stage's dep on params.yaml
        mine.add(str(paths.PARAMS))
    assert exact - mine == set(), f"stage {name} reads or writes paths dvc.yaml does not declare for it"
    assert mine - exact - possible == set(), f"stage {name} declares paths its code never names"

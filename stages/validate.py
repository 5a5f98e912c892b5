"""validate: the whole params.yaml (an unknown key too), the handbook and the files the params name, checked before
any other stage starts; every other stage depends on its output, so a bad input stops `dvc repro` here."""

from relaytune import paths
from relaytune.handbook import load_handbook, teacher_example
from relaytune.io import atomic_write_json
from relaytune.params import check_named_files, load_params
from relaytune.provenance import provenance
from relaytune.stage import run_stage


def main() -> None:
    params = load_params(paths.PARAMS)
    handbook = load_handbook(params.synth.handbook)
    teacher_example(handbook, params.synth.teacher_example, params.synth.handbook)
    check_named_files(params)
    # The same content whenever the inputs are valid: the stages that depend on it rerun for their own deps only.
    atomic_write_json(paths.VALIDATED, {"params.yaml": "valid", "synth.handbook": "valid",
                                        "named files": "present"})
    atomic_write_json(paths.provenance_file("validate"), provenance(
        stage="validate", seed=params.seed, base_model_hash=None, dtype=None,
        extra={"handbook": {"path": params.synth.handbook, "facts": len(handbook.facts)}}))


if __name__ == "__main__":
    run_stage(main)

import json
import re

import pytest

from medqa import settings
from medqa.errors import MedQAError


def test_profile_defaults_then_environment_then_parameters_cell():
    s = settings.resolve({"PROFILE": "smoke"}, env={})
    assert (s.MODEL, s.N_SAMPLES, s.MAX_LENGTH, s.EPOCHS, s.OUTPUT_DIR) == ("tiny", 200, 256, 1, "runs/smoke")
    s = settings.resolve({"PROFILE": "smoke"}, env={"MEDQA_BATCH_SIZE": "4", "MEDQA_MASK_PROMPT": "true",
                                                    "MEDQA_MAX_STEPS": "", "MEDQA_LEARNING_RATE": "1e-4"})
    assert (s.BATCH_SIZE, s.MASK_PROMPT, s.MAX_STEPS, s.LEARNING_RATE) == (4, True, None, 1e-4)
    s = settings.resolve({"PROFILE": "smoke", "BATCH_SIZE": 2}, env={"MEDQA_BATCH_SIZE": "4"})
    assert s.BATCH_SIZE == 2


def test_profile_can_come_from_the_environment_and_full_is_gpt2_medium():
    s = settings.resolve({}, env={"MEDQA_PROFILE": "full"})
    assert (s.MODEL, s.N_SAMPLES, s.MAX_LENGTH, s.EPOCHS) == ("gpt2-medium", None, 1024, 2)
    assert settings.resolve({}, env={"MEDQA_PROFILE": "cpu"}).MODEL == "gpt2"


@pytest.mark.parametrize("kind, profile", [("cuda", "full"), ("mps", "cpu"), ("cpu", "cpu")])
def test_default_profile_follows_the_hardware(monkeypatch, kind, profile):
    import torch

    from medqa import hardware

    monkeypatch.setattr(hardware, "pick_device", lambda: torch.device(kind))  # a GPU or a Mac, made up
    assert settings.resolve({}, env={}).PROFILE == profile


def test_ollama_host_comes_from_its_usual_variable():
    assert settings.resolve({"PROFILE": "smoke"}, env={"OLLAMA_HOST": "http://gpu-box:11434"}).OLLAMA_HOST \
        == "http://gpu-box:11434"
    assert settings.resolve({"PROFILE": "smoke"}, env={"OLLAMA_HOST": "0.0.0.0:11434"}).OLLAMA_HOST \
        == "http://0.0.0.0:11434"


def test_output_dir_records_the_run_and_accepts_the_same_settings_again(tmp_path):
    s = settings.resolve({"PROFILE": "smoke", "OUTPUT_DIR": str(tmp_path / "run")}, env={})
    out = settings.claim_output_dir(s)
    assert json.loads((out / "run.json").read_text())["SEED"] == 123
    settings.claim_output_dir(s)  # the same run again: resume, no complaint
    # MAX_STEPS only says where to stop, so changing it continues the same run
    settings.claim_output_dir(settings.resolve({"PROFILE": "smoke", "OUTPUT_DIR": str(tmp_path / "run"),
                                                "MAX_STEPS": 3}, env={}))


def test_bad_environment_values_are_named():
    with pytest.raises(MedQAError, match="MEDQA_BATCH_SIZE='eight'"):
        settings.resolve({"PROFILE": "smoke"}, env={"MEDQA_BATCH_SIZE": "eight"})
    with pytest.raises(MedQAError, match="MEDQA_BATCHSIZE"):
        settings.resolve({"PROFILE": "smoke"}, env={"MEDQA_BATCHSIZE": "8"})


# ---------------------------------------------------------------- a setting given that the run would not use

def papermill_cell(**params) -> str:
    """The cell papermill injects after the parameters cell, as papermill itself writes it."""
    from papermill.translators import PythonTranslator

    return PythonTranslator.codify(params)


def kernel_globals(injected: str | None = None, **assigned) -> dict:
    """A notebook's globals() when cell 4 runs: the parameters cell, papermill's cell (also in `In`, the
    kernel's input history), and names of the notebook's own."""
    namespace = {"In": ["", "# parameters\nPROFILE = None\n"], "Out": {}, "_": None, "settings": settings,
                 "MEDQA_REPO": "https://github.com/<owner>/<repo>", "QUESTION": "What is gout?", "model": object(),
                 "before": None, "sys": json, **{name: None for name in settings.Settings.__dataclass_fields__}}
    if injected is not None:
        namespace["In"].append(injected)
        exec(injected, {}, namespace)
    namespace.update(assigned)
    return namespace


def test_papermill_typo_is_refused_naming_the_setting_it_resembles():
    with pytest.raises(MedQAError, match=r"\['LEARNIN_RATE'\].*would not use.*did you mean LEARNING_RATE"):
        settings.notebook_params(kernel_globals(papermill_cell(LEARNIN_RATE=1e-4)))
    with pytest.raises(MedQAError, match=r"learning_rate: did you mean LEARNING_RATE"):
        settings.notebook_params(kernel_globals(papermill_cell(learning_rate=1e-4)))
    with pytest.raises(MedQAError, match=r"\['COLOUR'\]"):  # injected, though it resembles nothing
        settings.notebook_params(kernel_globals(papermill_cell(COLOUR="red")))


def test_a_typo_in_the_parameters_cell_itself_is_refused():
    with pytest.raises(MedQAError, match="EPOCH: did you mean EPOCHS"):
        settings.notebook_params(kernel_globals(EPOCH=3))
    with pytest.raises(MedQAError, match="Seed: did you mean SEED"):
        settings.notebook_params(kernel_globals(Seed=5))


def test_the_notebooks_own_names_and_the_given_settings_pass():
    params = settings.notebook_params(kernel_globals(papermill_cell(LEARNING_RATE=1e-4, PROFILE="smoke")))
    assert params["LEARNING_RATE"] == 1e-4 and params["PROFILE"] == "smoke" and "QUESTION" not in params
    assert settings.resolve(params, env={}).LEARNING_RATE == 1e-4


def test_the_notebook_builds_its_settings_with_the_check():
    nb = json.loads((settings.Path(__file__).resolve().parent.parent / "llm.ipynb").read_text(encoding="utf-8"))
    assert any("settings.notebook_params(globals())" in "".join(c["source"]) for c in nb["cells"])


@pytest.mark.parametrize("env, words", [
    ({"MEDQA_LEARNIN_RATE": "1e-4"}, "MEDQA_LEARNIN_RATE: did you mean MEDQA_LEARNING_RATE"),
    ({"medqa_seed": "5"}, "medqa_seed: did you mean MEDQA_SEED"),  # ignored before: the variable is lower-case
    ({"MEDQA_EPOCH": "3"}, "did you mean MEDQA_EPOCHS"),
])
def test_a_mistyped_environment_variable_names_the_one_it_resembles(env, words):
    with pytest.raises(MedQAError, match="Unknown environment variable") as err:
        settings.resolve({"PROFILE": "smoke"}, env=env)
    assert words in str(err.value)


@pytest.mark.parametrize("given, close", [("smok", "smoke"), ("Smoke", "smoke"), ("ful", "full"), ("CPU", "cpu")])
def test_a_mistyped_profile_names_the_one_it_resembles(given, close):
    with pytest.raises(MedQAError, match=f"PROFILE={given!r} is unknown \\(did you mean {close!r}\\?\\)"):
        settings.resolve({"PROFILE": given}, env={})


def test_a_params_dict_with_a_typo_names_the_setting():
    with pytest.raises(MedQAError, match=r"Unknown setting\(s\) \['LEARNIN_RATE'\].*did you mean LEARNING_RATE"):
        settings.resolve({"PROFILE": "smoke", "LEARNIN_RATE": 1e-4}, env={})


# ---------------------------------------------------------------- one list, one home

def test_the_known_models_and_the_run_defining_settings_are_one_list_each():
    from medqa import export, model as gpt, model_folder

    assert set(settings.KNOWN_MODELS) == set(gpt.HUB_IDS) | set(gpt.RANDOM_SHAPES)
    assert settings.KNOWN_MODELS is model_folder.KNOWN_MODELS
    assert export.CARD_SETTINGS[:len(settings.RUN_DEFINING)] == settings.RUN_DEFINING


def test_the_notebook_and_medqa_ask_check_a_model_folder_with_the_same_function(tmp_path):
    from medqa import ask, model as gpt, model_folder

    assert settings.check_model_folder is model_folder.check_model_folder
    folder = gpt.build_tiny_gpt2(tmp_path / "m", seed=0)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    said = []
    for check in (lambda: ask.check_model_folder(folder),
                  lambda: settings.resolve({"PROFILE": "smoke", "MODEL": str(folder)}, env={})):
        with pytest.raises(MedQAError) as err:
            check()
        said.append(str(err.value))
    assert said[0].startswith("--model=") and said[1].startswith("MODEL=")
    assert said[0].split(": ", 1)[1].split(";")[0] == said[1].split(": ", 1)[1].split(";")[0]  # the same problem


@pytest.mark.parametrize("url", ["s3://bucket/runs", "https://example.org/runs", "gs://b/r"])
def test_an_output_dir_that_is_a_url_is_refused_before_a_local_folder_is_made_of_it(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MedQAError, match=f"OUTPUT_DIR={url!r} is a URL.*local folder"):
        settings.resolve({"PROFILE": "smoke", "OUTPUT_DIR": url}, env={})
    assert list(tmp_path.iterdir()) == []


def test_papermills_own_path_parameters_pass():
    """`papermill --inject-paths` puts PAPERMILL_INPUT_PATH and PAPERMILL_OUTPUT_PATH into its cell: papermill's
    names, not a mistyped setting."""
    cell = papermill_cell(PAPERMILL_INPUT_PATH="llm.ipynb", PAPERMILL_OUTPUT_PATH="out.ipynb", EPOCHS=1)
    assert settings.notebook_params(kernel_globals(cell))["EPOCHS"] == 1
    with pytest.raises(MedQAError, match=r"\['PAPERMILL_SEED'\]"):  # only papermill's own names
        settings.notebook_params(kernel_globals(papermill_cell(PAPERMILL_SEED=1)))


def test_a_typo_fixed_in_the_cell_but_left_in_the_kernel_says_how_to_drop_it():
    """A mistyped name stays in the kernel's globals after the user corrects the cell and runs it again:
    the refusal says how to get rid of it, since the cell no longer shows it."""
    with pytest.raises(MedQAError, match=r"del EPOCH.*restart the kernel"):
        settings.notebook_params(kernel_globals(EPOCH=3, EPOCHS=3))


def test_a_profile_chosen_by_the_hardware_says_which_and_why(monkeypatch):
    import torch

    from medqa import hardware

    monkeypatch.setattr(hardware, "pick_device", lambda: torch.device("cpu"))
    lines = []
    settings.resolve({}, env={}, log=lines.append)
    assert lines == ["PROFILE not set: 'cpu' for this machine (no CUDA GPU (cpu): GPT-2 124M on 1,000 examples)."]
    lines.clear()
    settings.resolve({"PROFILE": "smoke"}, env={}, log=lines.append)
    assert lines == []  # a profile the user chose needs no reason


@pytest.mark.parametrize("name, given, meant", [("LORA_R", "8", "8"), ("BATCH_SIZE", "16", "16"),
                                                ("LEARNING_RATE", "1e-4", "0.0001"), ("N_SAMPLES", "200", "200"),
                                                ("LORA_ALPHA", "sixteen", "32"), ("DROPOUT", "0.1", "0.1")])
def test_a_number_given_as_text_is_answered_with_its_type_and_the_papermill_flag(name, given, meant):
    with pytest.raises(MedQAError) as err:
        settings.resolve({"PROFILE": "smoke", name: given}, env={})
    message = str(err.value)
    assert f"{name}={given!r} is text (str)" in message and f"-p {name} {meant}" in message
    assert "e.g. None" not in message


def test_claiming_the_run_folder_records_the_data_that_was_read(tmp_path):
    from medqa import run_folder, store

    cfg = settings.resolve({"PROFILE": "smoke", "OUTPUT_DIR": str(tmp_path / "run")}, env={})
    read = {"file": "mine.json", "rows": 300, "medquad": False}
    out = settings.claim_output_dir(cfg, data=read)
    try:
        assert store.read_json(out / "metrics.json", "")["data"] == read
    finally:
        run_folder.release(out)


def test_an_output_dir_on_a_read_only_mount_is_not_told_to_chmod(tmp_path, monkeypatch):
    import os

    real = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = real(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)  # as a read-only mount reports itself
    with pytest.raises(MedQAError, match="read-only file system") as err:
        settings.resolve({"PROFILE": "smoke", "OUTPUT_DIR": str(tmp_path / "run")}, env={})
    assert "chmod" not in str(err.value) and "writable disk" in str(err.value)


@pytest.mark.parametrize("change, words", [
    ({"BATCH_SIZE": "8"}, "is text (str)"), ({"BATCH_SIZE": 8.0}, "without the decimal point"),
    ({"OVERWRITE": "maybe"}, "must be True or False"), ({"SEED": True}, "must be a whole number"),
    ({"LEARNING_RATE": "x"}, "is text (str)")])
def test_validate_called_alone_still_checks_types(change, words):
    from dataclasses import replace

    cfg = settings.resolve({"PROFILE": "smoke"}, {}, log=lambda *a: None)
    with pytest.raises(MedQAError, match=re.escape(words)):
        settings.validate(replace(cfg, **change))

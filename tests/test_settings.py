import json

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

    from medqa import device

    monkeypatch.setattr(device, "pick_device", lambda: torch.device(kind))  # a GPU or a Mac, made up
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

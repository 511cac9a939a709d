"""LoRA: only the adapters train, a LoRA run resumes to the same end, answers work unmerged, and the saved folder is a
plain GPT-2 with the adapters merged in."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from medqa import export, generate, model as gpt, settings, train
from tests import fp32
from tests.test_training import Crashing, KernelDied, assert_same_run, setup  # noqa: F401 - a fixture

CPU = torch.device("cpu")


def run_lora(setup, out_dir, dataset=None, **overrides):  # noqa: F811
    s, train_set, val_loader, source = setup
    s = replace(s, OUTPUT_DIR=str(out_dir), LORA_R=4, EPOCHS=1, **overrides)
    torch.manual_seed(len(str(out_dir)))  # whatever drew random numbers before must not matter
    # Where the notebook applies LoRA: after load_model, before train.
    model = gpt.apply_lora(gpt.load_model(source, CPU, s.DROPOUT), s.LORA_R, s.LORA_ALPHA, s.DROPOUT, s.SEED)
    history = train.train(model, dataset or train_set, val_loader, train.TrainingConfig.from_settings(s), out_dir, log=lambda *_: None)
    return model, history


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):  # noqa: F811
    return run_lora(setup, tmp_path_factory.mktemp("lora"))


def test_only_the_adapters_train(setup, uninterrupted):  # noqa: F811
    model, history = uninterrupted
    base = gpt.load_model(setup[3], CPU)
    c = base.config
    per_layer = sum(4 * (fan_in + fan_out) for fan_in, fan_out in  # r * (in + out) for A (r x in) and B (out x r)
                    ((c.n_embd, 3 * c.n_embd), (c.n_embd, c.n_embd), (c.n_embd, 4 * c.n_embd), (4 * c.n_embd, c.n_embd)))
    assert gpt.count_trainable(model) == c.n_layer * per_layer
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in model.state_dict().items() if "lora_" not in k}
    for name, weight in base.state_dict().items():
        torch.testing.assert_close(frozen[name], weight, rtol=0, atol=0, msg=name)
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.05


def test_a_lora_run_stopped_by_max_steps_resumes_to_the_same_end(setup, uninterrupted, tmp_path):  # noqa: F811
    _, partial = run_lora(setup, tmp_path, MAX_STEPS=5)
    assert partial[-1]["step"] == 3
    assert any("lora_A" in k for k in torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"])
    assert_same_run(uninterrupted, run_lora(setup, tmp_path))


def test_a_lora_run_interrupted_by_an_exception_resumes_to_the_same_end(setup, uninterrupted, tmp_path):  # noqa: F811
    with pytest.raises(KernelDied):
        run_lora(setup, tmp_path, dataset=Crashing(setup[1], 4 * 2 * 7 + 3))  # during step 8, after step 4's checkpoint
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 4
    assert_same_run(uninterrupted, run_lora(setup, tmp_path))


def test_the_saved_folder_is_a_plain_gpt2_with_the_adapters_merged(uninterrupted, setup, tmp_path):  # noqa: F811
    model, _ = uninterrupted
    s = replace(settings.resolve({"PROFILE": "smoke", "LORA_R": 4}, env={}), OUTPUT_DIR=str(tmp_path))
    folder = export.save_model_folder(model, tmp_path / "model", s)
    assert not list(folder.glob("adapter*"))  # not a peft adapter folder that needs the base model beside it
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert type(plain).__name__ == "GPT2LMHeadModel" and not any("lora" in k for k in plain.state_dict())
    ids = torch.tensor([list(range(100, 140))])
    model.eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
        untuned = gpt.load_model(setup[3], CPU)(input_ids=ids).logits
    # W + scale * B A merged against x W + scale * (x A) B: the same products rounded apart (the merge rounds
    # each weight once more, by u)
    assert fp32.relative_error(got, want) <= 2 * fp32.network_bound(model.config) + fp32.U
    assert (untuned - want).abs().max() > 1e-2  # the adapters did change the answers: merging mattered
    assert gpt.count_trainable(model) > 0 and any("lora_A" in k for k in model.state_dict())  # still LoRA after saving


def test_an_unmerged_lora_model_answers_like_its_merged_copy(uninterrupted):
    model, _ = uninterrupted
    prompts = [list(range(200, 230)), list(range(300, 310))]
    unmerged = generate.generate_ids(model, prompts, generate.Decoding(12, repetition_penalty=1.1))
    assert unmerged == generate.generate_ids(gpt.merge_lora(model), prompts, generate.Decoding(12, repetition_penalty=1.1))

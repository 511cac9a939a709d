import pytest
import torch

from medqa import generate, model as gpt
from medqa.errors import MedQAError
from medqa.settings import TINY_MODEL


def test_tiny_model_is_saved_and_loaded_like_a_downloaded_one(tmp_path):
    source = gpt.model_source(TINY_MODEL, seed=0, cache_dir=tmp_path)
    assert (tmp_path / "tiny-seed0" / "config.json").exists()
    m = gpt.load_model(source, torch.device("cpu"))
    assert m.config.vocab_size == 50257 and m.config.n_positions == 1024 and m.config.n_layer == 2
    assert gpt.model_source("gpt2-medium", 0) == "openai-community/gpt2-medium"


def test_weights_that_cannot_be_loaded_name_the_ways_out(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedQAError, match="PROFILE=smoke.*MODEL=<a local folder"):
        gpt.load_model(str(tmp_path / "empty"), torch.device("cpu"))


def test_max_length_longer_than_the_context_is_refused(tiny_model):
    gpt.check_fits(1024, tiny_model)
    with pytest.raises(MedQAError, match="MAX_LENGTH=2048.*at most 1024"):
        gpt.check_fits(2048, tiny_model)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_model):
    torch.manual_seed(0)
    prompts = [torch.randint(0, 50000, (n,)).tolist() for n in (5, 17, 9, 30, 2)]
    batched = generate.generate_ids(tiny_model, prompts, max_new_tokens=12, batch_size=5)
    single = [generate.generate_ids(tiny_model, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(0 < len(r) <= 12 for r in batched)


def test_answering_between_epochs_leaves_the_model_training(tiny_model):
    tiny_model.train()
    try:
        generate.generate_ids(tiny_model, [[5, 6, 7]], max_new_tokens=2)
        assert tiny_model.training  # else dropout would be off for the epochs that follow
    finally:
        tiny_model.eval()


def test_answer_stops_at_end_of_text():
    assert generate.cut_answer([5, 6, 50256, 7]) == [5, 6]
    assert generate.cut_answer([5, 6]) == [5, 6]


def test_random_models_are_built_outside_output_dir_one_folder_per_name_and_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = gpt.model_source(TINY_MODEL, seed=0)
    assert source == str(tmp_path / "cache" / "medqa" / "random-init" / "tiny-seed0")
    again = gpt.model_source(TINY_MODEL, seed=0)
    other = gpt.model_source(TINY_MODEL, seed=1)
    assert again == source and other != source
    a, b = (gpt.load_model(s, torch.device("cpu")) for s in (source, other))
    assert not torch.equal(a.transformer.h[0].mlp.c_fc.weight, b.transformer.h[0].mlp.c_fc.weight)
    assert sorted(p.name for p in (tmp_path / "cache" / "medqa" / "random-init").iterdir()) == ["tiny-seed0", "tiny-seed1"]

import copy
from dataclasses import replace

import pandas as pd
import pytest
import torch

from medqa import generate, model as gpt, settings
from medqa.batches import EOT
from medqa.errors import MedQAError
from medqa.generate import Decoding
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
    gpt.check_max_length(1024, tiny_model)
    with pytest.raises(MedQAError, match="MAX_LENGTH=2048.*at most 1024"):
        gpt.check_max_length(2048, tiny_model)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_model):
    torch.manual_seed(0)
    prompts = [torch.randint(0, 50000, (n,)).tolist() for n in (5, 17, 9, 30, 2)]
    batched = generate.generate_ids(tiny_model, prompts, Decoding(12, batch_size=5))
    single = [generate.generate_ids(tiny_model, [p], Decoding(12, batch_size=1))[0] for p in prompts]
    assert batched == single
    assert all(0 < len(r) <= 12 for r in batched)


def test_answering_between_epochs_leaves_the_model_training(tiny_model):
    tiny_model.train()
    try:
        generate.generate_ids(tiny_model, [[5, 6, 7]], Decoding(2))
        assert tiny_model.training  # else dropout would be off for the epochs that follow
    finally:
        tiny_model.eval()


def test_answer_stops_at_end_of_text():
    assert generate.cut_answer([5, 6, 50256, 7]) == [5, 6]
    assert generate.cut_answer([5, 6]) == [5, 6]


def _eot_nearly_first(model, prompt):
    """A copy of `model` whose <|endoftext|> scores a little above the token it would write first after `prompt`.

    Greedy with the repetition penalty then ends that answer at once, unless something penalises <|endoftext|>.
    """
    first = generate.generate_ids(model, [prompt], Decoding(1))[0][0]
    assert first not in prompt  # else the penalty would hit both tokens alike
    eager = copy.deepcopy(model)
    with torch.no_grad():
        eager.transformer.wte.weight[EOT] = 1.05 * eager.transformer.wte.weight[first]  # tied to the output layer
    return eager


def test_batched_answers_equal_one_by_one_answers_at_the_notebooks_defaults(tiny_model, tokenizer):
    """The repetition penalty reads the input ids: counting the <|endoftext|> padding as said would end answers
    later in padded rows than alone (seen with `generate` told to ignore no padding)."""
    s = settings.resolve({"PROFILE": "smoke"}, env={})
    assert s.NO_REPEAT_NGRAM_SIZE > 0 and s.TEMPERATURE == 0  # a rule over said tokens: padding must not count
    torch.manual_seed(0)
    prompts = [torch.randint(0, 50000, (n,)).tolist() for n in (5, 17, 9, 30, 2)]
    model = _eot_nearly_first(tiny_model, prompts[0])
    one_by_one = [generate.answer(model, tokenizer, [p], Decoding.from_settings(s))[0] for p in prompts]
    assert one_by_one[0] == ""  # the case that padding with <|endoftext|> got wrong
    assert generate.answer(model, tokenizer, prompts, Decoding.from_settings(s)) == one_by_one


def test_a_long_prompt_in_the_batch_never_shortens_the_other_answers(tiny_model):
    torch.manual_seed(1)
    context = tiny_model.config.n_positions
    short, long = torch.randint(0, 50000, (40,)).tolist(), torch.randint(0, 50000, (context - 24,)).tolist()
    alone = [generate.generate_ids(tiny_model, [p], Decoding(30))[0] for p in (short, long)]
    assert len(alone[0]) > 24  # the short prompt's answer is longer than the long prompt leaves room for
    assert generate.generate_ids(tiny_model, [short, long], Decoding(30, batch_size=2)) == alone
    assert len(alone[1]) <= 24


def test_an_echoed_response_header_is_removed_as_the_recipe_removes_it(tiny_model):
    class Echo:  # a tokenizer whose every answer echoes the header
        def decode(self, ids):
            return "### Response:\nGlaucoma damages the optic nerve. "

    s = settings.resolve({"PROFILE": "smoke", "MAX_NEW_TOKENS": 1}, env={})
    assert generate.answer(tiny_model, Echo(), [[5, 6, 7]], Decoding.from_settings(s)) == ["Glaucoma damages the optic nerve."]
    assert generate.clean_answer(" It is rare.\n### Response: It is rare.") == "It is rare.\n It is rare."


def test_decoding_is_described_as_it_is_set():
    s = Decoding.from_settings(settings.resolve({"PROFILE": "smoke", "REPETITION_PENALTY": 1.1,
                                                 "NO_REPEAT_NGRAM_SIZE": 0}, env={}))
    assert generate.describe_decoding(s) == "greedy with repetition penalty 1.1"
    assert generate.describe_decoding(replace(s, repetition_penalty=1.0, no_repeat_ngram_size=3)) == \
        "greedy, never the same 3 tokens in a row twice in an answer"
    assert generate.describe_decoding(replace(s, repetition_penalty=1.0)) == "greedy"
    assert generate.describe_decoding(replace(s, temperature=0.7)) == "sampling at temperature 0.7 with repetition penalty 1.1"


def test_response_records_keep_the_source_and_focus_area():
    frame = pd.DataFrame({"instruction": ["What is gout ?"], "input": [""], "output": ["Arthritis."],
                          "source": ["MPlusHealthTopics"], "focus_area": ["Gout"], "prompt_ids": [[1]]})
    assert generate.response_records(frame, ["A joint disease."]) == [
        {"instruction": "What is gout ?", "input": "", "output": "Arthritis.", "source": "MPlusHealthTopics",
         "focus_area": "Gout", "model_response": "A joint disease."}]


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

"""The demo profile: a small GPT-2 shape, built locally from random weights, that the notebook trains offline."""

from medqa import model as gpt, settings


def test_the_demo_profile_resolves_offline_to_a_small_random_gpt2_shape(tmp_path):
    cfg = settings.resolve({"PROFILE": "demo"}, env={})
    assert cfg.MODEL == "random-gpt2-mini-deep" and cfg.MASK_PROMPT and cfg.MAX_LENGTH == 128
    assert cfg.PRECISION == "fp32"  # the stored run reproduces on every CPU, bf16 or not
    folder = gpt.model_source(cfg.MODEL, cfg.SEED, cache_dir=tmp_path)
    model = gpt.load_model(folder, "cpu")
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (8, 128, 50257)
    assert 8e6 < gpt.count_parameters(model) < 9e6  # GPT-2's vocabulary is most of it: tied embeddings

"""The memory plan's activation estimate against a measurement: the bytes a small GPT-2's training forward
(train.loss_sum) keeps for the backward pass, counted on the CPU with saved-tensor hooks. Also the fused GELU every
model is loaded with, which gives GPT-2's logits while keeping less for the backward pass."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from medqa import hardware, model as gpt, train
from medqa.hardware import Plan, Workload
from medqa.store import save_model_atomic
from tests import fp32

ROWS, LENGTH = 3, 100  # 300 tokens: no weight has a dimension of 300, so a weight is never taken for an activation


def small_gpt2(folder, n_layer, n_embd=128, n_head=4, vocab=1000, seed=0):
    """A random GPT-2 with a small vocabulary (so that the layers, not the logits, make up most of what is kept),
    saved with GPT-2's own `gelu_new` and loaded the way the project loads every model."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    save_model_atomic(GPT2LMHeadModel(config), folder)
    return gpt.load_model(str(folder), torch.device("cpu"), dropout=0.0).train()


def measured_saved_bytes(model, precision: str) -> int:
    """Bytes of the distinct storages the training forward keeps for the backward pass: activations only, not the
    weights nor the 16-bit copies autocast makes of them (the estimate counts those with the weights)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {s for p in model.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        is_weight_copy = t.dtype != torch.float32 and tuple(t.shape) in weight_shapes
        if storage.data_ptr() not in weights and not is_weight_copy:
            kept[storage.data_ptr()] = storage.nbytes()  # one count per storage, however many views save it
        return t

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (ROWS, LENGTH), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train.loss_sum(model, batch, Plan(precision))
    return sum(kept.values())


def estimated_saved_bytes(model, precision: str, checkpointing: bool = False) -> int:
    n = gpt.count_parameters(model)
    return Workload(n, n, model.config, LENGTH, precision).saved_bytes(ROWS, checkpointing)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return {n: small_gpt2(root / f"l{n}", n) for n in (2, 4)}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_plan_counts_at_least_what_a_training_forward_keeps_and_not_much_more(models, precision):
    model = models[4]
    measured, estimated = measured_saved_bytes(model, precision), estimated_saved_bytes(model, precision)
    print(f"{precision}: measured {measured / 2**20:.2f} MiB kept for the backward pass, estimated "
          f"{estimated / 2**20:.2f} MiB ({estimated / measured:.2f}x)")
    assert measured <= estimated <= 1.5 * measured


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_per_layer_constant_is_the_measured_one_plus_a_small_margin(models, precision):
    """Two models that differ only in their number of layers: the difference is what one layer keeps."""
    per_layer = measured_saved_bytes(models[4], precision) - measured_saved_bytes(models[2], precision)
    per_token = per_layer / 2 / (ROWS * LENGTH) / models[2].config.n_embd
    constant = hardware.ACTIVATION_BYTES["fp32" if precision == "fp32" else "half"]
    print(f"{precision}: {per_token:.2f} bytes per token, layer and n_embd measured; the plan counts {constant}")
    assert per_token <= constant <= 1.15 * per_token


def test_with_checkpointing_each_layer_keeps_only_its_input(models, tmp_path):
    model = small_gpt2(tmp_path / "ck", 4)
    gpt.enable_checkpointing(model)
    measured = measured_saved_bytes(model, "bf16")
    assert measured < measured_saved_bytes(models[4], "bf16") / 2
    c = model.config  # what the backward pass recomputes, one layer at a time, comes on top in the estimate
    one_layer = hardware.ACTIVATION_BYTES["half"] * c.n_embd * ROWS * LENGTH
    assert measured <= estimated_saved_bytes(model, "bf16", checkpointing=True) - one_layer <= 1.5 * measured


def test_every_model_loads_with_the_fused_gelu_and_is_saved_with_it(models, tmp_path):
    folder = tmp_path / "original"
    small_gpt2(folder, 2)
    assert json.loads((folder / "config.json").read_text())["activation_function"] == "gelu_new"  # GPT-2's own
    model = gpt.load_model(str(folder), torch.device("cpu"))
    assert model.config.activation_function == "gelu_pytorch_tanh"
    save_model_atomic(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["activation_function"] == "gelu_pytorch_tanh"



@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_a_folder_saved_with_another_activation_keeps_it(tmp_path, activation):
    config = GPT2Config(vocab_size=1000, n_positions=128, n_layer=1, n_head=2, n_embd=32,
                        activation_function=activation)
    save_model_atomic(GPT2LMHeadModel(config), tmp_path / "m")
    model = gpt.load_model(str(tmp_path / "m"), torch.device("cpu"))
    assert model.config.activation_function == activation
    assert type(model.transformer.h[0].mlp.act) is type(GPT2LMHeadModel(config).transformer.h[0].mlp.act)

@pytest.mark.numerics
def test_the_fused_gelu_gives_gpt2s_values_and_logits(tmp_path):
    x = torch.linspace(-12, 12, 100_001, dtype=torch.float64)
    # the same formula: two float64 evaluations of about ten roundings (2^-53 each) of values up to 12 differ
    # by about 1e-14 at most; 1e-12 leaves room and would still catch another formula (exact GELU: 1e-3)
    assert float((F.gelu(x, approximate="tanh") - NewGELUActivation()(x)).abs().max()) < 1e-12
    config = GPT2Config(vocab_size=1000, n_positions=128, n_layer=2, n_head=4, n_embd=128,
                        bos_token_id=999, eos_token_id=999)
    torch.manual_seed(0)
    original = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's tiny random weights barely reach the GELU's curve: make them reach it
        for block in original.transformer.h:
            block.mlp.c_fc.weight.mul_(30)
    save_model_atomic(original, tmp_path / "m")
    fused = gpt.load_model(str(tmp_path / "m"), torch.device("cpu")).eval()
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(input_ids=ids).logits, fused(input_ids=ids).logits
    assert float(a.abs().max()) > 1  # logits worth comparing
    assert type(original.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    assert type(fused.transformer.h[0].mlp.act).__name__ == "GELUTanh"
    assert fp32.relative_error(b, a) <= 2 * fp32.network_bound(config)  # the same arithmetic, rounded apart


def test_checkpointing_comes_on_without_a_deprecation_warning_non_reentrant_and_with_lora(tiny_model, monkeypatch):
    import copy
    import warnings
    from dataclasses import replace

    from medqa import settings

    s = settings.resolve({"PROFILE": "smoke"}, env={})
    model = copy.deepcopy(tiny_model)
    c, n = model.config, gpt.count_parameters(model)
    one_row = Workload(n, n, c, s.MAX_LENGTH, "fp32").peak_bytes(1)
    free = int(one_row / 0.85) - n * 4 - 1024  # one row fits only with checkpointing
    monkeypatch.setattr(hardware, "capabilities", lambda device: hardware.Capabilities("cuda", "Tesla T4", False, free))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5 deprecates gradient_checkpointing_enable
        plan = train.plan_run(model, s.BATCH_SIZE, s.MAX_LENGTH, "fp32").record()
        lora = gpt.apply_lora(copy.deepcopy(tiny_model), 4)
        gpt.enable_checkpointing(lora)
    assert plan["gradient_checkpointing"] and plan["micro_batch"] == 1
    for m in (model, lora):
        block = m.get_base_model().transformer.h[0] if m is lora else m.transformer.h[0]
        assert block.gradient_checkpointing
        assert block._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    train.loss_sum(lora.train(), {"input_ids": ids, "labels": ids}, Plan("fp32")).backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)  # the adapters learn through it


def test_training_and_validation_build_no_kv_cache(tiny_model, monkeypatch):
    """GPT-2's config asks for a KV cache; a training forward that built one would keep its copies of every layer's
    keys and values for the backward pass (where attention saves its inputs, as CUDA's kernels do)."""
    import copy

    from transformers.models.gpt2 import modeling_gpt2

    built = []

    class Counted(modeling_gpt2.DynamicCache):
        def __init__(self, *args, **kwargs):
            built.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(modeling_gpt2, "DynamicCache", Counted)
    model = copy.deepcopy(tiny_model).train()
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    train.train_step(model, train.make_optimizer(model, 1e-3, 0.1), [batch], Plan("fp32"))
    train.mean_loss(model, [batch], Plan("fp32"))
    assert built == []
    model(input_ids=ids)  # the config's default does build one: the count above would have seen it
    assert len(built) == 1

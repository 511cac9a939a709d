"""The speed-ups change no numbers: grouped batches give the same per-example loss as random ones,
batched KV-cache generation gives the same greedy answers as the textbook's one-at-a-time loop, and the oneDNN
layers used while answering on the CPU compute what the model's own layers compute."""

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench import textbook_batches, textbook_generate
from medqa.batches import IGNORE, LengthGroupedBatches, QADataset, collate
from medqa import cpu_kernels
from medqa.cpu_kernels import OneDNNLinear, onednn_linears
from medqa.generate import Decoding, generate_ids, left_pad
from tests import fp32


def per_example_loss(model, examples, order, max_length):
    """Loss of each example inside the given batches, unmasked as both ways train (right padding + causal)."""
    out = {}
    model.eval()
    with torch.no_grad():
        for idx in order:
            b = collate([examples[i] for i in idx], max_length)
            logits = model(input_ids=b["input_ids"]).logits
            losses = F.cross_entropy(logits.transpose(1, 2), b["labels"], ignore_index=IGNORE, reduction="none")
            for row, i in enumerate(idx):
                keep = b["labels"][row] != IGNORE
                out[i] = losses[row][keep].mean().item()
    return out


@pytest.mark.numerics
def test_grouped_and_random_batches_give_the_same_per_example_loss(tiny_model):
    g = torch.Generator().manual_seed(0)
    examples = QADataset(pd.DataFrame({
        "prompt_ids": [torch.randint(0, 50000, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(40)],
        "answer_ids": [torch.randint(0, 50000, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(40)]}), 100)
    grouped = per_example_loss(tiny_model, examples, LengthGroupedBatches(examples.lengths, 8, seed=1).batches(0), 100)
    textbook = per_example_loss(tiny_model, examples, textbook_batches(len(examples), 8, 1), 100)
    alone = per_example_loss(tiny_model, examples, [[i] for i in range(len(examples))], 100)  # no padding at all
    assert grouped.keys() == textbook.keys() == set(range(40))
    # each loss: a mean over at most 100 targets of log-sum-exps over the vocabulary, computed in batches of
    # other shapes (other kernel blocking): float32 allows sum_bound(100 * vocab) of it, twice (two ways)
    bound = 2 * fp32.sum_bound(100 * tiny_model.config.vocab_size)
    for i in range(40):
        assert abs(grouped[i] - alone[i]) <= bound * alone[i] and abs(textbook[i] - alone[i]) <= bound * alone[i]


@pytest.mark.numerics
def test_batched_generation_matches_the_textbook_loop(tiny_model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (3, 25, 11, 40)]
    textbook = [textbook_generate(tiny_model, p, 20) for p in prompts]
    assert generate_ids(tiny_model, prompts, Decoding(20, batch_size=4)) == textbook


@pytest.mark.numerics
def test_onednn_layers_compute_the_same_and_the_model_gets_its_own_back(tiny_model):
    layers = dict(tiny_model.named_modules())
    weights = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ids = torch.randint(0, 50000, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own = tiny_model(input_ids=ids).logits
        with onednn_linears(tiny_model):
            swapped = [n for n, m in tiny_model.named_modules() if isinstance(m, OneDNNLinear)]
            fast = tiny_model(input_ids=ids).logits
    assert len(swapped) == 4 * tiny_model.config.n_layer + 1  # attention in/out, MLP in/out; the output head
    assert fp32.relative_error(fast, own) <= 2 * fp32.network_bound(tiny_model.config)  # each way's rounding
    assert dict(tiny_model.named_modules()) == layers  # the very same layer objects
    assert all(torch.equal(v, weights[k]) for k, v in tiny_model.state_dict().items())


def test_onednn_layers_are_put_back_after_an_error(tiny_model):
    layers = dict(tiny_model.named_modules())
    with pytest.raises(KeyboardInterrupt):
        with onednn_linears(tiny_model):
            raise KeyboardInterrupt
    assert dict(tiny_model.named_modules()) == layers


def test_a_bf16_model_keeps_its_layers(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    with onednn_linears(model):
        assert not any(isinstance(m, OneDNNLinear) for m in model.modules())


# ---------------------------------------------------------------- which way answers, chosen per machine

def test_the_kernels_chosen_are_the_fastest_that_beat_the_default_by_the_margin_and_bf16_must_agree():
    choose_path = cpu_kernels.choose_kernels

    assert choose_path({"default": {"seconds": 1.0}, "onednn": {"seconds": 0.98, "same_tokens": True}}) == "default"
    assert choose_path({"default": {"seconds": 1.0}, "onednn": {"seconds": 0.8, "same_tokens": True}}) == "onednn"
    assert choose_path({"default": {"seconds": 1.0}, "onednn": {"seconds": 0.8, "same_tokens": True},
                        "bf16": {"seconds": 0.5, "same_tokens": True}}) == "bf16"
    assert choose_path({"default": {"seconds": 1.0}, "onednn": {"seconds": 0.8, "same_tokens": True},
                        "bf16": {"seconds": 0.5, "same_tokens": False}}) == "onednn"  # faster, but other answers
    assert choose_path({"default": {"seconds": 1.0}, "onednn": {"error": "could not create a primitive"}}) == "default"


@pytest.mark.parametrize("error", [RuntimeError, AttributeError, NotImplementedError])
def test_a_path_that_fails_on_this_machine_is_ruled_out_not_fatal(tiny_model, monkeypatch, error):
    def broken(model):
        raise error("could not create a primitive descriptor for a matmul primitive")

    monkeypatch.setattr(cpu_kernels, "KERNELS", {**cpu_kernels.KERNELS, "onednn": broken})
    monkeypatch.setattr(cpu_kernels, "candidate_kernels", lambda model: ["default", "onednn"])
    tiny_model.eval()
    with torch.no_grad():
        measured = cpu_kernels.measure_kernels(tiny_model, [[5, 6, 7], [8, 9]], left_pad)
    assert "could not create" in measured["onednn"]["error"] and cpu_kernels.choose_kernels(measured) == "default"


# what a private op raises: refusing its inputs; missing from this torch build; without a kernel for the CPU
PRIVATE_OP_ERRORS = [RuntimeError("could not create a primitive descriptor"),
                     AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_linear_pointwise'"),
                     NotImplementedError("Could not run 'mkldnn::_linear_pointwise' with arguments from the 'CPU' "
                                         "backend")]


@pytest.mark.numerics
@pytest.mark.parametrize("error", PRIVATE_OP_ERRORS, ids=lambda e: type(e).__name__)
def test_onednn_layers_fall_back_to_pytorchs_product_when_the_private_op_fails(tiny_model, monkeypatch, error):
    layer = tiny_model.transformer.h[0].mlp.c_fc
    fast = OneDNNLinear(layer.weight.t(), layer.bias)
    x = torch.randn(3, layer.weight.shape[0])
    expected = layer(x)

    def refuses(*args):
        raise error

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuses)
    # one product of inner length n_embd, by F.linear and by Conv1D's addmm: each rounds by sum_bound(n_embd)
    assert fp32.relative_error(fast(x), expected) <= 2 * fp32.sum_bound(layer.weight.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # where the private op failed in practice
        assert fast(x).shape == expected.shape


def test_a_torch_without_onednns_private_ops_answers_on_pytorchs_layers(tiny_model, monkeypatch):
    """Where torch is not the pinned version (Colab's CPU runtime), the ops may not exist at all: the layers are
    built anyway, as PyTorch's own, and the answers are those of the default path."""
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    expected = generate_ids(tiny_model, prompts, Decoding(6))
    monkeypatch.setattr(torch.ops, "mkldnn", torch.ops.medqa_no_such_namespace)  # every op: AttributeError
    with pytest.raises(AttributeError):
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 (what this torch says for a missing op)
    monkeypatch.setattr(cpu_kernels, "FORCED_KERNELS", "onednn")
    assert generate_ids(tiny_model, prompts, Decoding(6)) == expected


@pytest.mark.numerics
def test_bf16_layers_are_close_to_fp32_and_the_choice_is_made_once_per_model_shape(tiny_model, monkeypatch):
    ids = torch.randint(0, 50000, (2, 9), generator=torch.Generator().manual_seed(4))
    tiny_model.eval()
    with torch.no_grad():
        own = tiny_model(input_ids=ids).logits
        with cpu_kernels.KERNELS["bf16"](tiny_model):
            bf16 = tiny_model(input_ids=ids).logits
    # bf16 keeps 8 bits: each of the 4 * n_layer + 1 products rounds its input, its weights and its output to
    # bf16 (2^-9 each, relative; the sums themselves run in fp32), and the errors add along the network
    products = 4 * tiny_model.config.n_layer + 1
    assert fp32.relative_error(bf16, own) <= products * 3 * 2.0 ** -9
    calls = []
    monkeypatch.setattr(cpu_kernels, "_CHOSEN", {})
    monkeypatch.setattr(cpu_kernels, "candidate_kernels", lambda model: ["default", "onednn"])
    monkeypatch.setattr(cpu_kernels, "measure_kernels", lambda model, prompts, pad: calls.append(1) or
                        {"default": {"seconds": 1.0}, "onednn": {"seconds": 0.5, "same_tokens": True}})
    monkeypatch.setattr(cpu_kernels, "PROBE_PAYBACK", 1)  # calls of 384 prompts x new tokens repay a probe
    few, enough = [[5, 6, 7]] * 8, [[5, 6, 7]] * 32
    generate_ids(tiny_model, few, Decoding(12))  # 96 < 384: a probe would cost more than it can save
    assert calls == [] and cpu_kernels.chosen_kernels(tiny_model) is None
    generate_ids(tiny_model, enough, Decoding(12))
    generate_ids(copy.deepcopy(tiny_model), few, Decoding(2))  # a reloaded copy answers the same way
    assert calls == [1] and cpu_kernels.chosen_kernels(tiny_model)["kernels"] == "onednn"


def test_only_calls_much_larger_than_the_probe_are_probed():
    """Never much slower than PyTorch's default: a few questions to `python -m medqa.ask` in a fresh process (up to
    20 answers of 256 tokens) answer on the default layers; the notebook's test set in the cpu profile (50 answers of
    200 tokens) is probed."""
    from medqa.cpu_kernels import PROBE_PAYBACK, worth_probing

    assert PROBE_PAYBACK == 20
    assert not worth_probing(2, 4, 16) and not worth_probing(2, 10, 256) and not worth_probing(2, 20, 256)
    assert not worth_probing(2, 2000, 3)  # many prompts, little work
    assert worth_probing(2, 32, 240) and worth_probing(2, 50, 200)  # 7,680 = 20 x the probe's 384; 10,000
    assert not worth_probing(3, 32, 240)  # a third path makes the probe longer


def test_the_benchmarks_can_ask_for_the_choice_whatever_the_call(tiny_model, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_CHOSEN", {})
    monkeypatch.setattr(cpu_kernels, "candidate_kernels", lambda model: ["default", "onednn"])
    monkeypatch.setattr(cpu_kernels, "measure_kernels", lambda model, prompts, pad:
                        {"default": {"seconds": 1.0}, "onednn": {"seconds": 0.5, "same_tokens": True}})
    cpu_kernels.fastest_linears(tiny_model, [[5, 6, 7]], pad=left_pad)  # no max_new_tokens: as bench.py asks
    assert cpu_kernels.chosen_kernels(tiny_model)["kernels"] == "onednn"


def test_bf16_answers_are_never_chosen_by_a_timing(tiny_model, monkeypatch):
    """bf16 changes answers, and the notebook and `python -m medqa.ask` must answer alike: only fp32 ways compete,
    even on a CPU that computes bf16 natively (where bf16 is fastest)."""
    from medqa import hardware

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # what torch says about this CPU
        monkeypatch.setattr(torch.cpu, name, lambda: True)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert set(cpu_kernels.candidate_kernels(tiny_model)) <= {"default", "onednn"}
    probed = []
    monkeypatch.setattr(cpu_kernels, "_probe", lambda model, kernels, ids, mask: probed.append(kernels) or
                        (0.1, [[1]]))
    monkeypatch.setattr(cpu_kernels, "_CHOSEN", {})
    cpu_kernels.fastest_linears(tiny_model, [[5, 6, 7]] * 4, pad=left_pad)
    assert "bf16" not in probed and cpu_kernels.chosen_kernels(tiny_model)["kernels"] != "bf16"

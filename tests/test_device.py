"""Device, precision and memory choices, with made-up hardware: a 16 GB T4 (no native bf16), an 80 GB H100, a
16 GB Mac, CPUs with and without native bf16. Also the fp16 path's logic, run on the CPU, micro-batches that
change no numbers, checkpoints that load wherever the model trains, and the training loader the notebook shows."""

from dataclasses import replace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from medqa import batches, device as hw, model as gpt, store, train
from medqa.errors import MedQAError

GB = hw.GB
T4 = hw.Capabilities("cuda", "Tesla T4", native_bf16=False, free_bytes=int(14.6 * GB))
H100 = hw.Capabilities("cuda", "NVIDIA H100 80GB HBM3", native_bf16=True, free_bytes=79 * GB)
MAC16 = hw.Capabilities("mps", "Apple silicon (MPS)", native_bf16=False, free_bytes=int(10.7 * GB))
CPU_BF16 = hw.Capabilities("cpu", "AMD EPYC", native_bf16=True, free_bytes=22 * GB)
CPU_OLD = hw.Capabilities("cpu", "Intel Core i5", native_bf16=False, free_bytes=8 * GB)


def shape(name):
    """Config and parameter count of a GPT-2 size, without allocating its weights."""
    config = GPT2Config(vocab_size=50257, n_positions=1024, **gpt.RANDOM_SHAPES[name])
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    return config, n


MEDIUM = shape("random-gpt2-medium")


def test_the_random_models_have_gpt2s_sizes():
    assert round(shape("random-gpt2")[1] / 1e6) == 124
    assert round(MEDIUM[1] / 1e6) == 355


@pytest.mark.parametrize("caps, expected", [(T4, "fp16"), (H100, "bf16"), (MAC16, "fp32"), (CPU_BF16, "bf16"),
                                            (CPU_OLD, "fp32")])
def test_precision_follows_what_the_hardware_computes_natively(caps, expected):
    assert hw.choose_precision(caps) == expected
    assert hw.choose_precision(caps, "fp32") == "fp32"  # PRECISION, when set, wins


def full_profile_plan(caps):
    config, n = MEDIUM
    return hw.plan_memory(caps, n, n, config, batch_size=8, max_length=1024, precision=hw.choose_precision(caps))


def test_the_full_profile_does_not_fit_a_t4_in_one_pass_and_the_plan_makes_it_fit():
    config, n = MEDIUM
    whole = hw.estimate_peak_bytes(n, n, config.n_layer, config.n_embd, config.n_head, config.vocab_size, 8, 1024,
                                   "fp16")
    assert whole > T4.free_bytes  # the fp32 logits alone are 8 x 1024 x 50257 x 4 bytes, 1.6 GB
    assert whole > n * 16 + 8 * 1024 * 50257 * 4  # weights, grads, AdamW's moments, fp32 logits at least
    plan = full_profile_plan(T4)
    assert plan.micro_batch < 8 and plan.peak_bytes <= 0.85 * T4.free_bytes
    assert "micro-batches of" in plan.describe(8) and "Tesla" not in plan.describe(8)


def test_an_h100_takes_the_whole_batch_at_once():
    plan = full_profile_plan(H100)
    assert (plan.micro_batch, plan.checkpointing) == (8, False)


def test_a_16gb_mac_fits_the_full_profile_too():
    plan = full_profile_plan(MAC16)
    assert plan.peak_bytes <= 0.85 * MAC16.free_bytes
    # MPS keeps the attention matrix: the same plan on CUDA would be smaller
    config, n = MEDIUM
    assert hw.estimate_peak_bytes(n, n, config.n_layer, config.n_embd, config.n_head, config.vocab_size, 1, 1024,
                                  "fp32", attention_matrix=True) > \
        hw.estimate_peak_bytes(n, n, config.n_layer, config.n_embd, config.n_head, config.vocab_size, 1, 1024, "fp32")


def test_checkpointing_comes_in_when_no_micro_batch_fits_and_an_impossible_fit_says_what_to_lower():
    config, n = MEDIUM
    one_row = hw.estimate_peak_bytes(n, n, config.n_layer, config.n_embd, config.n_head, config.vocab_size, 1,
                                     1024, "fp16")
    tight = replace(T4, free_bytes=int(one_row / 0.85) - 1)
    plan = hw.plan_memory(tight, n, n, config, 8, 1024, "fp16")
    assert plan.checkpointing
    with pytest.raises(MedQAError, match="MAX_LENGTH.*MODEL.*LORA_R"):
        hw.plan_memory(replace(T4, free_bytes=4 * GB), n, n, config, 8, 1024, "fp16")


def test_a_cpu_plans_with_its_available_memory():
    plan = full_profile_plan(CPU_BF16)
    assert plan.peak_bytes <= 0.85 * CPU_BF16.free_bytes
    caps = hw.capabilities(torch.device("cpu"))
    assert caps.kind == "cpu" and caps.free_bytes > 0


def test_plan_run_records_precision_and_plan(tiny_model, monkeypatch):
    from medqa import settings

    s = settings.resolve({"PROFILE": "smoke"}, env={})
    monkeypatch.setattr(hw, "capabilities", lambda device: T4)
    plan = train.plan_run(tiny_model, s)
    assert plan["precision"] == "fp16" and plan["micro_batch"] == 8 and "Tesla T4" in plan["device"]
    assert train.plan_run(tiny_model, replace(s, PRECISION="fp32"))["precision"] == "fp32"


# ---------------------------------------------------------------- the training step on the CPU

def batch_of(n_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.randint(0, 50000, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist(),
              torch.randint(0, 50000, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist())
             for _ in range(n_rows)]
    return batches.collate(pairs, 64)


def fresh(tiny_model):
    import copy

    return copy.deepcopy(tiny_model).train()


def test_micro_batches_give_the_same_step_as_the_whole_batch(tiny_model):
    cpu = torch.device("cpu")
    a, b = fresh(tiny_model).eval(), fresh(tiny_model).eval()  # no dropout: the same numbers both ways
    group = [batch_of(6)]
    la = train.train_step(a, train.make_optimizer(a, 1e-3, 0.1, cpu), group, cpu, "fp32")
    lb = train.train_step(b, train.make_optimizer(b, 1e-3, 0.1, cpu), group, cpu, "fp32", micro_batch=4)
    assert len(train.micro_batches(group[0], 4)) == 2
    assert la[1:] == lb[1:] and float(la[0]) == pytest.approx(float(lb[0]), rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_the_fp16_path_scales_the_loss_and_skips_a_step_whose_gradients_overflow(tiny_model):
    cpu = torch.device("cpu")
    model = fresh(tiny_model)
    opt = train.make_optimizer(model, 1e-3, 0.1, cpu)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in model.parameters()]
    loss, _, _ = train.train_step(model, opt, [batch_of(4)], cpu, "fp16", scaler)
    assert torch.isfinite(loss) and scaler.get_scale() == 2.0 ** 10
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # it stepped
    # a gradient that overflows: the scaler skips the step and halves its scale
    after_first = [p.detach().clone() for p in model.parameters()]
    hook = model.transformer.wte.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    train.train_step(model, opt, [batch_of(4, seed=1)], cpu, "fp16", scaler)
    hook.remove()
    assert scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_first))


def test_fp16_autocast_is_what_loss_sum_runs_under(tiny_model, monkeypatch):
    seen = []
    real = torch.autocast

    def spy(device_type, dtype=None, enabled=True):
        seen.append((device_type, dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled)

    monkeypatch.setattr(train.torch, "autocast", spy)
    train.loss_sum(tiny_model, batch_of(2), torch.device("cpu"), "fp16")
    train.loss_sum(tiny_model, batch_of(2), torch.device("cpu"), "fp32")
    assert seen == [("cpu", torch.float16, True), ("cpu", None, False)]


def test_a_checkpoint_loads_on_the_cpu_so_its_random_state_can_be_restored(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"rng": {"torch": torch.get_rng_state()}, "model": {"w": torch.ones(2)}, "optimizer": {},
                "scheduler": {}, "state": {}}, path)
    ckpt = store.load_checkpoint(path)
    assert ckpt["rng"]["torch"].device.type == "cpu" and ckpt["rng"]["torch"].dtype == torch.uint8
    torch.set_rng_state(ckpt["rng"]["torch"])  # what resuming does; a GPU-mapped state is refused here
    # what the old map_location=device gave on a GPU machine ('meta' stands in for the GPU):
    moved = torch.load(path, map_location=torch.device("meta"), weights_only=False)
    with pytest.raises((TypeError, RuntimeError)):
        torch.set_rng_state(moved["rng"]["torch"])


def test_train_uses_the_loader_it_is_given_and_refuses_one_that_cannot_resume(tiny_model, tmp_path):
    from medqa import settings

    s = settings.resolve({"PROFILE": "smoke", "BATCH_SIZE": 2, "MAX_LENGTH": 64, "MAX_STEPS": 2,
                          "EVAL_EVERY": 1, "EVAL_BATCHES": 1}, env={})
    g = torch.Generator().manual_seed(3)
    import pandas as pd

    frame = pd.DataFrame({"prompt_ids": [torch.randint(0, 50000, (5 + i,), generator=g).tolist() for i in range(8)],
                          "answer_ids": [torch.randint(0, 50000, (9 - i,), generator=g).tolist() for i in range(8)]})
    data = batches.QADataset(frame, 64)
    loader = batches.make_loader(data, 2, 64, shuffle=True, seed=s.SEED)
    asked = []
    real_batches = loader.batch_sampler.batches
    loader.batch_sampler.batches = lambda epoch: asked.append(epoch) or real_batches(epoch)
    val = batches.make_loader(data, 2, 64, shuffle=False)
    history = train.train(fresh(tiny_model), loader, val, s, tmp_path, log=lambda *_: None)
    assert asked == [0] and len(history) == 2
    plain = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=loader.collate_fn)
    with pytest.raises(MedQAError, match="make_loader"):
        train.train(fresh(tiny_model), plain, val, s, tmp_path, log=lambda *_: None)

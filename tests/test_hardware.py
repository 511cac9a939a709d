"""Device, precision and memory choices, with made-up hardware: a 16 GiB T4 (no native bf16), a 24 GiB L4, an 80 GiB
H100, a 16 GiB Mac, CPUs with and without native bf16, and torch.cuda / torch.mps mocked as such machines show
them. Also the fp16 path's logic, run on the CPU, micro-batches that change no numbers, checkpoints that load
wherever the model trains, and the training loader the notebook shows."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from medqa import batches, hardware, model as gpt, store, train, training_run
from medqa.hardware import Plan, Workload
from medqa.errors import MedQAError
from tests import fp32

GiB = hardware.GiB


def shape(name):
    """Config and parameter count of a GPT-2 size, without allocating its weights."""
    config = GPT2Config(vocab_size=50257, n_positions=1024, **gpt.RANDOM_SHAPES[name])
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    return config, n


MEDIUM = shape("random-gpt2-medium")
MEDIUM_BYTES = MEDIUM[1] * 4  # gpt2-medium's fp32 weights: on the device already when plan_run reads its memory


def loaded(kind, name, native_bf16, free_at_start):
    """What plan_run sees: the memory still free once gpt2-medium sits on the device."""
    return hardware.Capabilities(kind, name, native_bf16, int(free_at_start - MEDIUM_BYTES))


# free memory on a fresh device: torch.cuda.mem_get_info after CUDA's own context (a Colab T4 has 14.7 GiB in all,
# a 24 GiB L4 22 GiB, an H100 79.1 GiB); a 16 GiB Mac lets Metal have torch.mps.recommended_max_memory(), 10.7 GiB
T4 = loaded("cuda", "Tesla T4", False, 14.6 * GiB)
L4 = loaded("cuda", "NVIDIA L4", True, 22.0 * GiB)
H100 = loaded("cuda", "NVIDIA H100 80GB HBM3", True, 78.5 * GiB)
MAC16 = loaded("mps", "Apple silicon (MPS)", False, 10.67 * GiB)
CPU_BF16 = hardware.Capabilities("cpu", "AMD EPYC", native_bf16=True, free_bytes=22 * GiB)
CPU_OLD = hardware.Capabilities("cpu", "Intel Core i5", native_bf16=False, free_bytes=8 * GiB)


def test_the_random_models_have_gpt2s_sizes():
    assert round(shape("random-gpt2")[1] / 1e6) == 124
    assert round(MEDIUM[1] / 1e6) == 355


@pytest.mark.parametrize("caps, expected", [(T4, "fp16"), (L4, "bf16"), (H100, "bf16"), (MAC16, "fp32"),
                                            (CPU_BF16, "bf16"), (CPU_OLD, "fp32")])
def test_precision_follows_what_the_hardware_computes_natively(caps, expected):
    assert hardware.choose_precision(caps)[0] == expected
    assert hardware.choose_precision(caps, "fp32")[0] == "fp32"  # PRECISION, when set, wins


def medium(precision, length=1024, attention_matrix=False):
    """What gpt2-medium's training step's memory depends on, fully trained."""
    config, n = MEDIUM
    return Workload(n, n, config, length, precision, attention_matrix)


def full_profile_plan(caps):
    """The full profile's plan (gpt2-medium, batches of 8 x 1024 tokens) as plan_run makes it on `caps`."""
    plan = hardware.plan_memory(caps, medium(hardware.choose_precision(caps)[0]), 8, resident_bytes=MEDIUM_BYTES)
    print(f"{caps.name}, {plan.precision}: {plan.describe()}")
    assert plan.budget_bytes == int((caps.free_bytes + MEDIUM_BYTES) * 0.85)  # the weights are counted once
    assert plan.peak_bytes <= plan.budget_bytes
    return plan


def test_the_full_profile_does_not_fit_a_t4_in_one_pass_and_the_plan_makes_it_fit():
    config, n = MEDIUM
    whole = medium("fp16").peak_bytes(8)
    assert whole > T4.free_bytes + MEDIUM_BYTES  # the fp32 logits alone are 8 x 1024 x 50257 x 4 bytes, 1.6 GiB
    assert whole > n * 16 + 8 * 1024 * 50257 * 4  # weights, grads, AdamW's moments, fp32 logits at least
    plan = full_profile_plan(T4)
    assert (plan.micro_batch, plan.checkpointing) == (4, False)
    assert "micro-batches of 4 rows, 2 passes" in plan.describe() and "Tesla" not in plan.describe()


def test_a_24gb_card_with_bf16_takes_the_whole_batch_at_once():
    plan = full_profile_plan(L4)
    assert (plan.micro_batch, plan.checkpointing) == (8, False)


def test_an_h100_takes_the_whole_batch_at_once():
    plan = full_profile_plan(H100)
    assert (plan.micro_batch, plan.checkpointing) == (8, False) and plan.peak_bytes < plan.budget_bytes / 3


def test_a_16gb_mac_fits_the_full_profile_too():
    full_profile_plan(MAC16)  # unified memory: Metal's share of it, less what it holds
    # MPS keeps the attention matrix: the same plan on CUDA would be smaller
    assert medium("fp32", attention_matrix=True).peak_bytes(1) > medium("fp32").peak_bytes(1)


def test_checkpointing_comes_in_when_no_micro_batch_fits_and_an_impossible_fit_says_what_to_lower():
    one_row = medium("fp16").peak_bytes(1)
    tight = replace(T4, free_bytes=int(one_row / 0.85) - 1)
    plan = hardware.plan_memory(tight, medium("fp16"), 8)
    assert plan.checkpointing
    with pytest.raises(MedQAError, match="does not fit the 3.4 GiB.*MAX_LENGTH.*MODEL.*LORA_R"):
        hardware.plan_memory(replace(T4, free_bytes=4 * GiB), medium("fp16"), 8)


def test_a_cpu_plans_with_its_available_memory():
    plan = full_profile_plan(CPU_BF16)
    assert plan.peak_bytes <= 0.85 * CPU_BF16.free_bytes
    caps = hardware.capabilities(torch.device("cpu"))
    assert caps.kind == "cpu" and caps.free_bytes > 0


def test_plan_run_records_precision_and_plan(tiny_model, monkeypatch):
    from medqa import settings

    s = settings.resolve({"PROFILE": "smoke"}, env={})
    monkeypatch.setattr(hardware, "capabilities", lambda device: T4)
    plan = train.plan_run(tiny_model, s.BATCH_SIZE, s.MAX_LENGTH, s.PRECISION)
    assert plan.precision == "fp16" and plan.micro_batch == 8 and "Tesla T4" in plan.device
    assert train.plan_run(tiny_model, s.BATCH_SIZE, s.MAX_LENGTH, "fp32").precision == "fp32"


def test_plan_run_counts_the_loaded_models_weights_once(tiny_model, monkeypatch):
    """The free memory plan_run reads is what the loaded model left; the estimate counts the weights, so the budget
    gives them back: a batch that fits only that way is taken whole."""
    from medqa import settings

    model = fresh(tiny_model)
    s = settings.resolve({"PROFILE": "smoke"}, env={})
    c, n = model.config, gpt.count_parameters(model)
    whole = Workload(n, n, c, s.MAX_LENGTH, "fp16").peak_bytes(s.BATCH_SIZE)
    free = int(whole / 0.85) - n * 4 + 1024  # what is left with the model loaded, when the whole batch just fits
    monkeypatch.setattr(hardware, "capabilities", lambda device: replace(T4, free_bytes=free))
    plan = train.plan_run(model, s.BATCH_SIZE, s.MAX_LENGTH, s.PRECISION).record()
    assert plan["micro_batch"] == s.BATCH_SIZE and not plan["gradient_checkpointing"]
    assert plan["budget_gib"] == round(int((free + n * 4) * 0.85) / GiB, 2)


# ---------------------------------------------------------------- what capabilities() reads, with mocks

def mock_cuda(monkeypatch, name, capability, free):
    """torch.cuda as a CPU-only build cannot show it: a GPU of compute capability `capability` that can emulate
    bf16 (as a T4 or V100 can, slowly)."""
    props = SimpleNamespace(major=capability[0], minor=capability[1], name=name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, free + GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


@pytest.mark.parametrize("name, capability, precision", [("Tesla T4", (7, 5), "fp16"), ("Tesla V100", (7, 0), "fp16"),
                                                         ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16"),
                                                         ("NVIDIA H100 80GB HBM3", (9, 0), "bf16")])
def test_cuda_capabilities_count_only_native_bf16(monkeypatch, name, capability, precision):
    mock_cuda(monkeypatch, name, capability, 13 * GiB)
    caps = hardware.capabilities(torch.device("cuda"))
    assert (caps.kind, caps.name, caps.free_bytes) == ("cuda", name, 13 * GiB)
    assert caps.native_bf16 == (capability >= (8, 0))  # not a T4's emulated bf16
    assert hardware.choose_precision(caps)[0] == precision



def test_memory_pytorch_caches_counts_as_free_to_a_rerun(monkeypatch):
    """After a run in the same session (a notebook re-run after running out of memory), the allocator keeps blocks
    the driver reports as used: they are this process's to reuse, and the plan must count them."""
    mock_cuda(monkeypatch, "Tesla T4", (7, 5), 9 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GiB)
    assert hardware.capabilities(torch.device("cuda")).free_bytes == 13 * GiB

def test_mps_capabilities_take_metals_share_less_what_it_holds(monkeypatch):
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: int(10.67 * GiB))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: int(1.5 * GiB))
    caps = hardware.capabilities(torch.device("mps"))
    assert (caps.kind, caps.native_bf16, caps.free_bytes) == ("mps", False, int(10.67 * GiB) - int(1.5 * GiB))
    assert hardware.choose_precision(caps)[0] == "fp32"


def test_out_of_memory_is_recognised_on_cuda_and_mps_only():
    assert hardware.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.53 GiB"))
    assert hardware.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9.02 GiB, other "
                                            "allocations: 1.20 GiB, max allowed: 10.67 GB)."))
    assert hardware.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                            "`cublasCreate(handle)`"))
    assert not hardware.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not hardware.is_out_of_memory(ValueError("out of memory"))


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


@pytest.mark.numerics
def test_micro_batches_give_the_same_step_as_the_whole_batch(tiny_model):
    group = [batch_of(6)]

    def step(model, micro_batch=None):
        """The step's result and the gradients AdamW steps with (accumulated and clipped). Not the weights
        after it: AdamW's first update is about lr * g / |g|, so a gradient near zero that rounds to the other
        sign moves its weight by 2 * lr either way."""
        opt, seen = train.make_optimizer(model, 1e-3, 0.1), {}
        opt.register_step_pre_hook(lambda *_: seen.update(grads=[p.grad.clone() for p in model.parameters()]))
        return train.train_step(model, opt, group, Plan("fp32", micro_batch=micro_batch)), seen["grads"]

    whole, g_whole = step(fresh(tiny_model).eval())  # eval: no dropout, the same numbers both ways
    parts, g_parts = step(fresh(tiny_model).eval(), micro_batch=4)
    exact, g_exact = step(fresh(tiny_model).double().eval())  # float64 (but for the loss's float32 logits)
    assert len(train.micro_batches(group[0], 4)) == 2
    assert whole[1:] == parts[1:] == exact[1:]  # the same targets and tokens counted
    # Each way against float64 (and so against each other, within twice the bound). The loss sums n_targets
    # log-sum-exps over the vocabulary; the gradients' longest sum is the norm that clipping takes over every
    # gradient element, and its rounding scales every gradient alike.
    vocab, n_grads = tiny_model.config.vocab_size, sum(g.numel() for g in g_exact)
    for loss in (whole.loss, parts.loss):
        assert fp32.relative_error(loss, exact.loss) <= fp32.sum_bound(whole.n_targets * vocab)
    for name, a, b, want in zip([n for n, _ in tiny_model.named_parameters()], g_whole, g_parts, g_exact):
        assert fp32.relative_error(a, want) <= fp32.sum_bound(n_grads), name
        assert fp32.relative_error(b, want) <= fp32.sum_bound(n_grads), name


def test_the_fp16_path_scales_the_loss_and_skips_a_step_whose_gradients_overflow(tiny_model):
    model = fresh(tiny_model)
    opt = train.make_optimizer(model, 1e-3, 0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in model.parameters()]
    loss, _, _, _ = train.train_step(model, opt, [batch_of(4)], Plan("fp16"), scaler)
    assert torch.isfinite(loss) and scaler.get_scale() == 2.0 ** 10
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # it stepped
    # a gradient that overflows: the scaler skips the step and halves its scale
    after_first = [p.detach().clone() for p in model.parameters()]
    hook = model.transformer.wte.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    train.train_step(model, opt, [batch_of(4, seed=1)], Plan("fp16"), scaler)
    hook.remove()
    assert scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_first))


def test_fp16_autocast_is_what_the_training_and_validation_passes_run_under(tiny_model, monkeypatch):
    seen = []
    real = torch.autocast

    def spy(device_type, dtype=None, enabled=True):
        seen.append((device_type, dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled)

    monkeypatch.setattr(hardware.torch, "autocast", spy)
    model = fresh(tiny_model)
    train.train_step(model, train.make_optimizer(model, 1e-3, 0.1), [batch_of(2)], Plan("fp16"))
    train.mean_loss(model, [batch_of(2)], Plan("fp16"))
    train.mean_loss(model, [batch_of(2)], Plan("fp32"))
    assert seen == [("cpu", torch.float16, True)] * 2 + [("cpu", None, False)]


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
    config = train.TrainingConfig.from_settings(s)
    history = train.train(fresh(tiny_model), loader, val, config, tmp_path, log=lambda *_: None)
    assert asked == [0] and len(history) == 2
    plain = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=loader.collate_fn)
    with pytest.raises(MedQAError, match="make_loader"):
        train.train(fresh(tiny_model), plain, val, config, tmp_path, log=lambda *_: None)


# ---------------------------------------------------------------- choices from the capability and the free memory

def test_pascal_trains_in_fp32_and_says_why():
    p100 = hardware.Capabilities("cuda", "Tesla P100-PCIE-16GB", False, 15 * GiB, (6, 0))
    precision, reason = hardware.choose_precision(p100)
    assert precision == "fp32" and "compute capability 6.0" in reason and "slower" in reason
    assert hardware.choose_precision(replace(p100, compute_capability=(7, 5)))[0] == "fp16"  # a T4
    assert hardware.choose_precision(p100, "fp16") == ("fp16", "PRECISION is set")


def test_plan_run_reads_the_capability_of_a_mocked_pascal_gpu(monkeypatch):
    mock_cuda(monkeypatch, "Tesla P4", (6, 1), 7 * GiB)
    caps = hardware.capabilities(torch.device("cuda"))
    assert caps.compute_capability == (6, 1) and hardware.choose_precision(caps)[0] == "fp32"


@pytest.mark.parametrize("free, profile", [(7.2 * GiB, "cpu"), (14.6 * GiB, "full"), (78.5 * GiB, "full")])
def test_full_is_the_default_only_where_gpt2_medium_fits(free, profile):
    """An 8 GiB card (7.2 GiB free after CUDA's context): the full profile's fixed part alone (weights, gradients,
    AdamW's moments, about 6 GiB) leaves no room for a batch row."""
    caps = hardware.Capabilities("cuda", "NVIDIA GPU", False, int(free), (7, 5))
    chosen, reason = hardware.choose_profile(caps)
    print(chosen, reason)
    assert chosen == profile and caps.name in reason
    assert hardware.choose_profile(MAC16)[0] == "cpu"


def test_the_default_profile_on_a_mocked_8gb_card_is_cpu(monkeypatch):
    from medqa import settings

    mock_cuda(monkeypatch, "NVIDIA GeForce RTX 3070", (8, 6), int(7.2 * GiB))
    monkeypatch.setattr(hardware, "pick_device", lambda: torch.device("cuda"))
    assert settings.default_profile() == "cpu"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(22 * GiB), 24 * GiB))
    assert settings.default_profile() == "full"


def test_mps_free_memory_does_not_count_the_allocators_cache(monkeypatch):
    held = {"bytes": 9 * GiB}  # 7 GiB of it cached by PyTorch's allocator after an earlier run in this session
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: held.update(bytes=2 * GiB))
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * GiB)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: held["bytes"])
    assert hardware.capabilities(torch.device("mps")).free_bytes == 14 * GiB


def test_mps_work_is_waited_for_before_a_clock_is_read(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append("cuda"))
    for kind in ("mps", "cuda", "cpu"):
        hardware.synchronize(torch.device(kind))
    assert waited == ["mps", "cuda"]


def test_cuda_random_states_saved_on_more_gpus_restore_on_the_gpus_present(monkeypatch):
    restored = []

    def set_rng_state(state, device=None):
        if device >= 1:
            raise RuntimeError(f"Invalid device index {device}")  # what torch.cuda says on a one-GPU machine
        restored.append((int(state[0]), device))

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    state = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([1], dtype=torch.uint8),
                                                      torch.tensor([2], dtype=torch.uint8)]}
    training_run.set_rng_state(state, torch.device("cuda"))
    assert restored == [(1, 0)]


def test_the_default_precision_of_validation_on_pascal_is_fp32_too(monkeypatch):
    mock_cuda(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0), 15 * GiB)
    hardware.capabilities_cached.cache_clear()
    assert Plan.default(torch.device("cuda")).precision == "fp32"
    hardware.capabilities_cached.cache_clear()  # the mocked GPU stays out of later tests


# ---------------------------------------------------------------- memory limits other than the machine's RAM

@pytest.mark.parametrize("files, room", [({"memory.max": "1073741824\n", "memory.current": "536870912\n"}, 512),
                                         ({"memory.max": "max\n", "memory.current": "536870912\n"}, None),
                                         ({"memory/memory.limit_in_bytes": "805306368\n",
                                           "memory/memory.usage_in_bytes": "268435456\n"}, 512),
                                         ({"memory/memory.limit_in_bytes": "9223372036854771712\n",
                                           "memory/memory.usage_in_bytes": "268435456\n"}, None)])
def test_a_cgroup_limit_caps_the_free_ram_the_plan_sees(tmp_path, monkeypatch, files, room):
    """cgroup v2 (memory.max) and v1 (memory.limit_in_bytes), as Docker, Kubernetes, JupyterHub and Colab set them;
    "max" and v1's near-2^63 mean no limit."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(hardware, "CGROUP", tmp_path)
    monkeypatch.setattr(hardware.psutil, "virtual_memory", lambda: SimpleNamespace(available=20 * GiB))
    monkeypatch.setattr(hardware.resource, "getrlimit", lambda which: (hardware.resource.RLIM_INFINITY,) * 2)
    assert hardware.free_ram() == (20 * GiB if room is None else room * 2 ** 20)
    assert hardware.capabilities(torch.device("cpu")).free_bytes == hardware.free_ram()


LIMITED = """
import resource, sys
import psutil, torch
from medqa import hardware, model as gpt, train
from medqa.errors import MedQAError
model = gpt.load_model(str(gpt.build_tiny_gpt2(sys.argv[1], seed=0)), torch.device("cpu"))
room = 300 * 2 ** 20
resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + room, resource.RLIM_INFINITY))
free = hardware.capabilities(torch.device("cpu")).free_bytes
assert 0 < free <= room, free
try:
    train.plan_run(model, 64, 1024, "fp32")
except MedQAError as err:
    print("refused:", err)
try:
    torch.empty(2 ** 30, dtype=torch.uint8)
except RuntimeError as err:
    print("out of memory:", hardware.is_out_of_memory(err), str(err)[:200])
"""


def test_under_ulimit_v_the_plan_sees_the_limit_and_the_allocators_failure_is_out_of_memory(tmp_path):
    """`ulimit -v` (RLIMIT_AS) in a process of its own: the plan reads the room the limit leaves, a batch that
    cannot fit is refused with the fix, and the CPU allocator's error counts as running out of memory (so that
    training runs the smaller micro-batch: tests/test_training_memory.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", LIMITED, str(tmp_path / "tiny")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import re

    # 0.85 of the room and the model's own weights: about 0.27 GiB
    assert re.search(r"refused: The model does not fit the 0\.[23] GiB available on this cpu device", done.stdout), \
        done.stdout
    assert "MAX_LENGTH (now 1024)" in done.stdout and "LORA_R" in done.stdout
    assert "out of memory: True" in done.stdout and "DefaultCPUAllocator" in done.stdout


def test_the_cpu_allocators_failure_is_out_of_memory():
    try:
        torch.empty(2 ** 62, dtype=torch.uint8)
    except RuntimeError as err:
        assert hardware.is_out_of_memory(err)

"""The benchmark scripts stay runnable: each starts (imports everything it uses) and answers --help. Their
figures come from running them, not from tests."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_there_are_benchmarks():
    assert {p.name for p in SCRIPTS} >= {"bench.py", "profiles.py", "lora.py", "torch_compile.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_script_starts(script):
    if "--help" not in script.read_text() and "argparse" not in script.read_text():
        # no command line of its own: importing it is what can break
        code = f"import runpy; runpy.run_path({str(script)!r}, run_name='not_main')"
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    else:
        done = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_flops_counted_from_the_shape_are_those_pytorch_counts():
    """benchmarks/limits.py's counts against torch.utils.flop_counter on a small GPT-2 (eager attention, whose
    products the counter sees): a training step over two rows, and answers with a KV cache."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks import limits

    config = GPT2Config(vocab_size=1000, n_positions=128, n_layer=2, n_head=2, n_embd=32, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    ids = torch.randint(1, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counted:
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    assert counted.get_total_flops() == limits.training_flops(config, [20, 20])
    model.eval()
    for new in (1, 5):
        with torch.no_grad(), FlopCounterMode(display=False) as counted:
            model.generate(input_ids=ids[:1, :10], attention_mask=torch.ones(1, 10, dtype=torch.long),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert counted.get_total_flops() == limits.answer_flops(config, [10], [new])

"""Does torch.compile pay for the project's training step on this machine?

    python benchmarks/torch_compile.py      # about 7 minutes on a 2-core CPU

GPT-2 124M architecture (random weights), batch 8, the project's train_step (bf16 autocast where the device has
it, fused AdamW, no attention mask), over batches of eight different lengths, as length-grouped batches come,
taken twice: the first pass pays for compiling (a fresh compile cache, so nothing is reused from earlier runs), the
second shows the steady state. Prints seconds per pass for eager and compiled.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # a cold compile, as a user's first

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench import GPT2_124M, make_model  # noqa: E402
from medqa.hardware import Plan, cpu_name  # noqa: E402
from medqa import train  # noqa: E402
from medqa.hardware import pick_device  # noqa: E402

LENGTHS = [512, 448, 384, 320, 256, 500, 200, 400]


def one_way(compiled: bool, device, batches) -> list[float]:
    model = make_model(GPT2_124M, "project", 0).to(device).train()
    if compiled:
        model.compile()
    opt = train.make_optimizer(model, 5e-5, 0.1)
    seconds = []
    for b in batches + batches:
        t = time.perf_counter()
        loss = train.train_step(model, opt, [b], Plan.default(device)).loss
        float(loss)  # the sync a logging loop makes anyway
        seconds.append(time.perf_counter() - t)
    return seconds


def main():
    device = pick_device()
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in LENGTHS:
        ids = torch.randint(0, 50257, (8, n), generator=g).to(device)
        batches.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    print(f"{device.type} ({cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name()}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch lengths {LENGTHS}, twice")
    for compiled in (False, True):
        s = one_way(compiled, device, batches)
        half = len(LENGTHS)
        print(f"{'compiled' if compiled else 'eager':>8}: first pass {sum(s[:half]):6.1f} s, second pass "
              f"{sum(s[half:]):6.1f} s; steps {[round(x, 1) for x in s]}", flush=True)


if __name__ == "__main__":
    main()

"""How much the demo profile's training moves with the precision and the CPU's kernels.

    python benchmarks/precision.py                  # 320 steps each: fp32, bf16, fp32 on AVX2 kernels
    python benchmarks/precision.py --steps 40 --ways fp32 bf16

Each way runs the notebook's own training (medqa.train.train, the demo profile's data, model, seed, schedule
and validation sample) for its first `steps` optimizer steps, in a fresh process whose environment may cap the
kernels PyTorch and oneDNN choose (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA: both are read when torch is
imported). The schedule is that of the whole profile (MAX_STEPS does not reshape it), so the points are those
of the notebook's run up to `steps`. Writes benchmarks/precision.json and prints each way's loss curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
WAYS = {"fp32": ("fp32", {}), "bf16": ("bf16", {}), "fp32-avx2": ("fp32", AVX2), "bf16-avx2": ("bf16", AVX2)}


def run_one(precision: str, steps: int) -> dict:
    """The demo profile's first `steps` steps in `precision`, in this process."""
    sys.path.insert(0, str(ROOT))
    import torch

    from medqa import batches, data, gpt2_tokenizer, model as gpt, settings, split, train

    quiet = lambda *_: None  # noqa: E731
    s = settings.resolve({"PROFILE": "demo", "PRECISION": precision, "MAX_STEPS": steps}, env={}, log=quiet)
    s = replace(s, OUTPUT_DIR=tempfile.mkdtemp(prefix="medqa-precision-"))
    path = data.locate_data(os.environ.get("MEDQA_DATA_PATH"), ROOT / "data")
    clean, _ = data.clean(data.read_table(path))
    df = batches.encode_examples(data.sample_rows(clean, s.N_SAMPLES, s.SEED, log=quiet),
                                 gpt2_tokenizer.get_tokenizer())
    train_df, val_df, _ = split.split_by_question(df, s.VAL_FRACTION, s.TEST_FRACTION, s.SEED, log=quiet)
    train_set, val_set = batches.QADataset(train_df, s.MAX_LENGTH), batches.QADataset(val_df, s.MAX_LENGTH)
    loader = batches.make_loader(train_set, s.BATCH_SIZE, s.MAX_LENGTH, shuffle=True, seed=s.SEED,
                                 mask_prompt=s.MASK_PROMPT)
    val_sample, _ = batches.sample_examples(val_set, s.EVAL_BATCHES * s.BATCH_SIZE, s.SEED)
    val_loader = batches.make_loader(val_sample, s.BATCH_SIZE, s.MAX_LENGTH, shuffle=False,
                                     mask_prompt=s.MASK_PROMPT)
    cache = Path(tempfile.gettempdir()) / "medqa-precision-models"
    model = gpt.load_model(gpt.model_source(s.MODEL, s.SEED, cache_dir=cache), torch.device("cpu"), s.DROPOUT)
    torch.manual_seed(s.SEED)  # as the notebook's first cell
    history = train.train(model, loader, val_loader, train.TrainingConfig.from_settings(s), s.OUTPUT_DIR,
                          log=quiet)
    return {"precision": precision, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "threads": torch.get_num_threads(),
            "history": [{k: h[k] for k in ("step", "train_loss", "val_loss")} for h in history]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=320)
    ap.add_argument("--ways", nargs="+", choices=sorted(WAYS), default=["fp32", "bf16", "fp32-avx2"])
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child's precision
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.steps)))
        return
    results = {}
    for way in args.ways:
        precision, caps = WAYS[way]
        child = subprocess.run([sys.executable, __file__, "--one", precision, "--steps", str(args.steps)],
                               env={**os.environ, **caps}, capture_output=True, text=True, check=True)
        results[way] = json.loads(child.stdout.strip().splitlines()[-1])
        print(way, [(h["step"], h["train_loss"], h["val_loss"]) for h in results[way]["history"]], flush=True)
    (HERE / "precision.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

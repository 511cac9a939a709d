"""LoRA (LORA_R=16) against full fine-tuning, GPT-2 124M shapes with random weights, the same MedQuAD examples.

    MEDQA_DATA_PATH=data/medquad.csv python benchmarks/lora.py      # about 9 minutes on a 2-core CPU

Each run is a fresh process (its peak memory is its own) that builds the same random GPT-2 124M, takes the same
length-grouped batches and trains them with the project's own step (train.train_step, train.make_optimizer, bf16
autocast where the CPU has it) at the same learning rate; LoRA wraps the model with medqa.model.apply_lora first,
as the notebook does. The ways alternate (full, LoRA, full, LoRA, ...) and repeat; the table gives the median and
the spread (min-max) of each figure. Writes benchmarks/lora_results.json.

Random weights cost what GPT-2's cost (time, memory), but the losses only say how fast each way fits these examples
from a random start; they are not GPT-2 results.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from bench import GPT2_124M, isolated, load_splits, make_model  # noqa: E402
from medqa.hardware import Plan, cpu_name  # noqa: E402
from medqa import batches, model as gpt, train  # noqa: E402
from medqa.store import write_json_atomic  # noqa: E402

WAYS = ("full", "lora")


def run(way: str, dataset: batches.QADataset, val_set: batches.QADataset, cfg: dict) -> dict:
    """Train `cfg["steps"]` steps one way; time all but the first (allocator and kernel warm-up)."""
    device = torch.device("cpu")
    model = make_model(GPT2_124M, "project", seed=0)  # the same random weights both ways
    if way == "lora":
        model = gpt.apply_lora(model, cfg["lora_r"])
    torch.manual_seed(123)
    opt = train.make_optimizer(model, cfg["lr"], 0.1)
    order = batches.LengthGroupedBatches(dataset.lengths, cfg["batch_size"], seed=123).batches(0)[: cfg["steps"]]
    make = partial(batches.collate, max_length=cfg["max_length"])
    model.train()
    tokens, elapsed = 0, 0.0
    for i, idx in enumerate(order):
        batch = make([dataset[j] for j in idx])
        t = time.perf_counter()
        loss, _, n_tokens, _ = train.train_step(model, opt, [batch], Plan.default(device))
        float(loss)  # the sync a logging loop makes anyway
        if i > 0:
            elapsed += time.perf_counter() - t
            tokens += n_tokens
    val_loader = batches.make_loader(val_set, cfg["batch_size"], cfg["max_length"], shuffle=False)
    return {"way": way, "trainable_parameters": gpt.count_trainable(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": round(tokens / elapsed, 1), "timed_steps": len(order) - 1,
            "val_loss_after": round(train.mean_loss(model, val_loader), 4),
            "peak_rss_mb_in_run": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values), "runs": values}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    cfg = {"steps": args.steps, "repeats": args.repeats, "batch_size": 4, "max_length": 128, "lr": 5e-5,
           "lora_r": 16, "lora_alpha": 32, "train_examples": 4 * args.steps, "val_examples": 8}
    started = time.perf_counter()
    train_df, val_df, _ = load_splits()
    dataset = batches.QADataset(train_df.sample(cfg["train_examples"], random_state=0), cfg["max_length"])
    val_set = batches.QADataset(val_df.head(cfg["val_examples"]), cfg["max_length"])
    runs = []
    for r in range(args.repeats):
        for way in WAYS:  # interleaved: full, LoRA, full, LoRA, ...
            result = isolated(run, way, dataset, val_set, cfg)
            result["repeat"] = r
            runs.append(result)
            print(result, flush=True)
    summary = {}
    for way in WAYS:
        mine = [x for x in runs if x["way"] == way]
        summary[way] = {"trainable_parameters": mine[0]["trainable_parameters"], "parameters": mine[0]["parameters"],
                        "tokens_per_s": spread([x["tokens_per_s"] for x in mine]),
                        "peak_memory_mb": spread([x["peak_rss_mb"] for x in mine]),
                        "val_loss_after": spread([x["val_loss_after"] for x in mine])}
    pairs = list(zip([x for x in runs if x["way"] == "lora"], [x for x in runs if x["way"] == "full"]))
    summary["lora_over_full"] = {
        "tokens_per_s": spread([round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in pairs]),
        "peak_memory": spread([round(a["peak_rss_mb"] / b["peak_rss_mb"], 3) for a, b in pairs])}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    results = {"settings": cfg, "device": f"cpu ({cpu_name()}, {os.cpu_count()} cores)",
               "cpu_flags": {f: f in flags.split() for f in ("avx512_bf16", "amx_tile", "amx_bf16")},
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "bf16_autocast": train.autocast_dtype(torch.device("cpu")) is not None,
               "load_average_at_end": os.getloadavg(), "summary": summary, "runs": runs,
               "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(HERE / "lora_results.json", results)
    print_table(results)


def print_table(r):
    s = r["summary"]
    print(f"\n{r['device']}, torch {r['torch']}, bf16 autocast {r['bf16_autocast']}, flags {r['cpu_flags']}")
    print(f"GPT-2 124M shapes, random weights; batch {r['settings']['batch_size']}, MAX_LENGTH "
          f"{r['settings']['max_length']}, {r['settings']['steps']} steps at lr {r['settings']['lr']}; "
          f"median (min-max) of {r['settings']['repeats']} interleaved runs each")
    for name, key in (("real tokens/s", "tokens_per_s"), ("peak memory (MB)", "peak_memory_mb"),
                      (f"val loss after {r['settings']['steps']} steps", "val_loss_after")):
        cells = [f"{s[w][key]['median']} ({s[w][key]['min']}-{s[w][key]['max']})" for w in WAYS]
        print(f"{name:<28} full {cells[0]:<28} LoRA {cells[1]}")
    print(f"{'trainable parameters':<28} full {s['full']['trainable_parameters']:<28,} LoRA "
          f"{s['lora']['trainable_parameters']:,}")
    print(f"LoRA / full: tokens/s {s['lora_over_full']['tokens_per_s']['median']} "
          f"({s['lora_over_full']['tokens_per_s']['min']}-{s['lora_over_full']['tokens_per_s']['max']}), "
          f"peak memory {s['lora_over_full']['peak_memory']['median']}")


if __name__ == "__main__":
    main()

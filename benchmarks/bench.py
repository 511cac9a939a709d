"""The project's way against the textbook recipe (Raschka, LLMs from scratch, ch. 7), side by side.

    python benchmarks/bench.py --quick      # about 7 minutes on a 2-core CPU, no loss curves
    python benchmarks/bench.py              # the full measurement (about 40 minutes on a 2-core CPU)

The data is MEDQA_DATA_PATH (or data/, or a download), as in the notebook. Writes benchmarks/results.json and
benchmarks/loss_curves.png and prints a table. Each measurement runs in a fresh process, so that its peak
memory is its own.

The textbook way, faithfully: random shuffled batches padded to their longest example, fp32, plain AdamW, eager
attention, mean loss per batch; answers one prompt at a time, greedy argmax over the whole recomputed sequence
until end-of-text or the token limit. Both ways use the same architecture, weights, examples and limits.
The project's answers are timed a second time with PyTorch's default fp32 kernels (MKL) in place of oneDNN, so
that batching with the KV cache and the kernels each show what they give; all three must answer alike.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from medqa import batches, data, prompts, train  # noqa: E402
from medqa.batches import EOT, IGNORE  # noqa: E402
from medqa.generate import generate_ids  # noqa: E402

HERE = Path(__file__).resolve().parent
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768)
TINY = dict(n_layer=2, n_head=2, n_embd=64)


# ---------------------------------------------------------------- data

def load_splits(seed: int = 123):
    """MedQuAD, cleaned, formatted, tokenized and split exactly as the notebook does."""
    df, _ = data.clean(data.read_table(data.locate_data(os.environ.get("MEDQA_DATA_PATH"), ROOT / "data")))
    df = batches.encode_examples(df, batches.get_tokenizer())
    return prompts.split_by_question(df, 0.10, 0.05, seed)


def textbook_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [idx[i: i + batch_size] for i in range(0, n, batch_size)]


def make_model(arch: dict, attn: str, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)  # the same weights for both ways
    config = GPT2Config(vocab_size=50257, n_positions=1024, attn_implementation=attn, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, **arch)  # fine-tuning without dropout, as both recipes do
    return GPT2LMHeadModel(config)


# ---------------------------------------------------------------- training, one way or the other

def textbook_step(model, opt, batch):
    logits = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach() * int((batch["labels"] != IGNORE).sum()), int(batch["attention_mask"].sum())


def run_training(way: str, arch: dict, dataset: batches.QADataset, max_length: int, batch_size: int, lr: float,
                 seed: int, steps: int | None = None, val_pairs=None, eval_every: int = 0):
    """Train on `dataset` (one pass, or `steps` steps); returns timing of all but the first step, and losses."""
    torch.manual_seed(seed)
    device = torch.device("cpu")
    make = partial(batches.collate, max_length=max_length)
    if way == "project":
        model = make_model(arch, "sdpa", seed)
        opt = train.make_optimizer(model, lr, 0.1, device)
        order = batches.LengthGroupedBatches(dataset.lengths, batch_size, seed=seed).batches(0)
        step = partial(train.train_step, model, opt, device=device)
        run_step = lambda b: step([b])[::2]  # noqa: E731 - (loss sum, real tokens)
    else:
        model = make_model(arch, "eager", seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=False, fused=False)
        order = textbook_batches(len(dataset), batch_size, seed)
        run_step = partial(textbook_step, model, opt)
    order = order[:steps] if steps else order
    model.train()
    curve, tokens, padded, elapsed = [], 0, 0, 0.0
    for i, idx in enumerate(order):
        batch = make([dataset[j] for j in idx])
        t = time.perf_counter()
        loss, n_tokens = run_step(batch)
        loss = float(loss)  # the sync a logging loop makes anyway
        if i > 0:  # the first step warms up allocators and kernels
            elapsed += time.perf_counter() - t
            tokens += n_tokens
            padded += batch["input_ids"].numel()
        if val_pairs is not None and (i + 1) % eval_every == 0:
            curve.append({"step": i + 1, "train_loss": loss / int((batch["labels"] != IGNORE).sum()),
                          "val_loss": _val_loss(model, val_pairs, max_length)})
    return {"real_tokens": tokens, "padded_tokens": padded, "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None, "curve": curve}


@torch.no_grad()
def _val_loss(model, pairs, max_length):
    """The same yardstick for both ways: mean loss per target token on fixed validation examples, in fp32.

    Deliberately not train.mean_loss, which is the project's own (bf16, unmasked) path: the judge of the two
    ways should be neither of them."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(pairs), 8):
        b = batches.collate(pairs[s: s + 8], max_length)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((b["labels"] != IGNORE).sum())
    model.train()
    return total / count


# ---------------------------------------------------------------- answering, one way or the other

@torch.no_grad()
def textbook_generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if nxt == EOT:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def run_generation(way: str, arch: dict, prompts_: list[list[int]], max_new_tokens: int, batch_size: int = 32):
    model = make_model(arch, "eager" if way == "textbook" else "sdpa").eval()
    if way == "project_mkl":  # the project's way with PyTorch's default fp32 kernels (MKL): what oneDNN adds
        torch.backends.mkldnn.enabled = False
    if way != "textbook":
        answer_all = lambda ps, n: generate_ids(model, ps, n, batch_size=batch_size)  # noqa: E731
    else:
        answer_all = lambda ps, n: [textbook_generate(model, p, n) for p in ps]  # noqa: E731
    answer_all(prompts_[:1], 2)  # warm-up, not timed
    t = time.perf_counter()
    answers = answer_all(prompts_, max_new_tokens)
    elapsed = time.perf_counter() - t
    new = sum(len(a) for a in answers)
    return {"new_tokens": new, "seconds": round(elapsed, 2), "tokens_per_s": round(new / elapsed, 1),
            "answers": answers}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _child(fn, args, queue):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    result = fn(*args)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    queue.put(result)


def isolated(fn, *args):
    """Run fn(*args) in a fresh process; its result carries the process's peak memory."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ---------------------------------------------------------------- main

def plot_curves(project, textbook, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, res, style in (("project", project, "-"), ("textbook", textbook, "--")):
        steps = [c["step"] for c in res["curve"]]
        ax.plot(steps, [c["val_loss"] for c in res["curve"]], style, label=f"{name}: validation")
        ax.plot(steps, [c["train_loss"] for c in res["curve"]], style, alpha=0.4, label=f"{name}: train batch")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.set_title("Tiny GPT-2, same seed and data: project vs textbook training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer examples and prompts, no loss curves (about 7 minutes)")
    args = ap.parse_args(argv)
    q = args.quick
    cfg = {"train_examples": 48 if q else 160, "train_max_length": 512, "batch_size": 8,
           "gen_prompts": 8 if q else 32, "gen_new_tokens": 64 if q else 128,
           "curve_steps": 0 if q else 300, "curve_max_length": 256, "curve_lr": 5e-3}
    started = time.perf_counter()
    train_df, val_df, test_df = load_splits()
    results = {"quick": q, "settings": cfg, "device": f"cpu ({cpu_name()}, {os.cpu_count()} cores)",
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "bf16_autocast": train.autocast_dtype(torch.device("cpu")) is not None}

    # 1. Share of real tokens, whole train split, MAX_LENGTH 1024, batch 8.
    full = batches.QADataset(train_df, 1024)
    grouped = batches.LengthGroupedBatches(full.lengths, 8, seed=123).batches(0)
    results["token_efficiency"] = {
        "project": round(batches.token_efficiency(full.lengths, grouped), 4),
        "textbook": round(batches.token_efficiency(full.lengths, textbook_batches(len(full), 8, 123)), 4),
        "examples": len(full)}
    print("token efficiency:", results["token_efficiency"], flush=True)

    # 2. Training throughput, GPT-2 124M architecture (random weights), batch 8, MAX_LENGTH 512.
    examples = batches.QADataset(train_df.sample(cfg["train_examples"], random_state=0), 512)
    tr = {}
    for way in ("project", "textbook"):
        tr[way] = isolated(run_training, way, GPT2_124M, examples, 512, 8, 5e-5, 123)
        tr[way].pop("curve")
        print(f"train {way}:", tr[way], flush=True)
    tr["ratio"] = round(tr["project"]["tokens_per_s"] / tr["textbook"]["tokens_per_s"], 2)
    results["train_tokens_per_s"] = tr

    # 3. Answer throughput, same architecture, test prompts, greedy.
    test_prompts = list(test_df["prompt_ids"][: cfg["gen_prompts"]])
    gen = {}
    for way in ("project", "project_mkl", "textbook"):
        gen[way] = isolated(run_generation, way, GPT2_124M, test_prompts, cfg["gen_new_tokens"])
        print(f"generate {way}:", {k: v for k, v in gen[way].items() if k != "answers"}, flush=True)
    answers = {way: gen[way].pop("answers") for way in ("project", "project_mkl", "textbook")}
    same = sum(a == b == c for a, b, c in zip(answers["project"], answers["project_mkl"], answers["textbook"]))
    gen["identical_answers"] = f"{same}/{len(test_prompts)}"
    gen["ratio"] = round(gen["project"]["tokens_per_s"] / gen["textbook"]["tokens_per_s"], 2)
    gen["ratio_with_mkl"] = round(gen["project_mkl"]["tokens_per_s"] / gen["textbook"]["tokens_per_s"], 2)
    results["generate_tokens_per_s"] = gen

    # 4. Loss curves of both ways on the tiny model: the speed-up must not change what is learned (full run only).
    if cfg["curve_steps"]:
        curve_set = batches.QADataset(train_df.sample(cfg["curve_steps"] * 8, random_state=1), 256)
        val_pairs = batches.QADataset(val_df.head(64), 256).pairs
        curves = {way: isolated(run_training, way, TINY, curve_set, 256, 8, cfg["curve_lr"], 123, None, val_pairs,
                                max(cfg["curve_steps"] // 15, 1)) for way in ("project", "textbook")}
        plot_curves(curves["project"], curves["textbook"], HERE / "loss_curves.png")
        results["loss_curves"] = {way: {"final_val_loss": round(c["curve"][-1]["val_loss"], 4),
                                        "tokens_per_s": c["tokens_per_s"]} for way, c in curves.items()}
    results["seconds"] = round(time.perf_counter() - started, 1)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(r):
    tr, gen, eff = r["train_tokens_per_s"], r["generate_tokens_per_s"], r["token_efficiency"]
    rows = [
        ("real tokens / tokens processed (MAX_LENGTH 1024, batch 8)", eff["project"], eff["textbook"], ""),
        ("training, real tokens/s (GPT-2 124M, batch 8, MAX_LENGTH 512)", tr["project"]["tokens_per_s"],
         tr["textbook"]["tokens_per_s"], f"{tr['ratio']}x"),
        ("training, peak memory (MB)", tr["project"]["peak_rss_mb"], tr["textbook"]["peak_rss_mb"], ""),
        (f"answers, new tokens/s ({r['settings']['gen_prompts']} prompts, {r['settings']['gen_new_tokens']} new)",
         gen["project"]["tokens_per_s"], gen["textbook"]["tokens_per_s"], f"{gen['ratio']}x"),
        ("answers, new tokens/s, project's way with MKL's fp32 layers", gen["project_mkl"]["tokens_per_s"],
         gen["textbook"]["tokens_per_s"], f"{gen['ratio_with_mkl']}x"),
        ("answers, peak memory (MB)", gen["project"]["peak_rss_mb"], gen["textbook"]["peak_rss_mb"], ""),
        ("identical greedy answers", gen["identical_answers"], "", ""),
    ]
    if "loss_curves" in r:
        rows.append(("tiny model, final validation loss (loss_curves.png)", r["loss_curves"]["project"]["final_val_loss"],
                     r["loss_curves"]["textbook"]["final_val_loss"], ""))
    print(f"\n{r['device']}, torch {r['torch']}, {r['threads']} threads, bf16 autocast: {r['bf16_autocast']}")
    print(f"| {'measure':<66} | {'project':>9} | {'textbook':>9} | {'ratio':>6} |")
    print(f"|{'-' * 68}|{'-' * 11}|{'-' * 11}|{'-' * 8}|")
    for name, a, b, c in rows:
        print(f"| {name:<66} | {a!s:>9} | {b!s:>9} | {c:>6} |")


if __name__ == "__main__":
    main()

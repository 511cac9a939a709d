"""The project's way against the textbook recipe (Raschka, LLMs from scratch, ch. 7), side by side.

    python benchmarks/bench.py --quick      # fewer examples and prompts, no loss curves
    python benchmarks/bench.py              # the full measurement, with loss curves

The data is MEDQA_DATA_PATH (or data/, or a download), as in the notebook. Writes benchmarks/results.json and
benchmarks/loss_curves.png and prints a table.

The machine may be busy with other work, so every figure is a median over rounds, and the ways take turns
within each round (A B A B ..., the order rotating from round to round): a busy moment slows whichever way runs
then, and the ratio of each round compares ways that ran side by side. Reported: the median ratio over the
rounds and its spread (lowest and highest round).

The textbook way, faithfully: random shuffled batches padded to their longest example, fp32, plain AdamW, eager
attention, mean loss per batch; answers one prompt at a time, greedy argmax over the whole recomputed sequence.
Both ways use the same architecture, weights, examples and limits. The project's answers are timed the way
medqa.cpu_kernels.fastest_linears picks on this machine ("project") and each candidate forced: PyTorch's default
fp32 layers, oneDNN's fp32 layers, bf16 weights (where the CPU computes bf16 natively).

Each way's work is counted in FLOPs from the model's shape and set against the limits measured in the same
process: the matmul peak of the precision it computes in, and, for answering, the memory bandwidth
(benchmarks/limits.py says how).

Random weights never write end-of-text, so every answer is stopped where its reference answer ends: end-of-text is
forced after min(reference length, new-token limit) tokens, the same for every way, and only those tokens count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from transformers import LogitsProcessor  # noqa: E402

from benchmarks.limits import answer_flops, matmul_peak, matmul_weights, peaks, training_flops  # noqa: E402
from medqa import batches, cpu_kernels, data, generate, gpt2_tokenizer, hardware, split, train  # noqa: E402
from medqa.batches import EOT, IGNORE  # noqa: E402
from medqa.generate import Decoding, generate_ids  # noqa: E402
from medqa.model import ACTIVATION  # noqa: E402

HERE = Path(__file__).resolve().parent
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768)
TINY = dict(n_layer=2, n_head=2, n_embd=64)


# ---------------------------------------------------------------- data

def load_splits(seed: int = 123):
    """MedQuAD, cleaned, formatted, tokenized and split exactly as the notebook does."""
    df, _ = data.clean(data.read_table(data.locate_data(os.environ.get("MEDQA_DATA_PATH"), ROOT / "data")))
    df = batches.encode_examples(df, gpt2_tokenizer.get_tokenizer())
    return split.split_by_question(df, 0.10, 0.05, seed)


def textbook_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [idx[i: i + batch_size] for i in range(0, n, batch_size)]


def make_model(arch: dict, way: str, seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 with random weights, the same for both ways. The textbook way: eager attention and GELU written out
    (the book's own GELU, as GPT-2's config's `gelu_new`); the project's: fused attention and fused GELU, as
    medqa.model loads every GPT-2. Both GELUs are the same tanh formula."""
    torch.manual_seed(seed)
    textbook = way == "textbook"
    config = GPT2Config(vocab_size=50257, n_positions=1024, attn_implementation="eager" if textbook else "sdpa",
                        activation_function="gelu_new" if textbook else ACTIVATION, resid_pdrop=0.0,
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
        model = make_model(arch, "project", seed)
        opt = train.make_optimizer(model, lr, 0.1)
        order = batches.LengthGroupedBatches(dataset.lengths, batch_size, seed=seed).batches(0)
        step = partial(train.train_step, model, opt, plan=hardware.Plan.default(device))
        run_step = lambda b: step([b])[::2]  # noqa: E731 - (loss sum, real tokens)
    else:
        model = make_model(arch, "textbook", seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=False, fused=False)
        order = textbook_batches(len(dataset), batch_size, seed)
        run_step = partial(textbook_step, model, opt)
    order = order[:steps] if steps else order
    model.train()
    # The first step pays one-off costs (optimizer state, allocator, kernel set-up). Throughput runs pay them on a
    # short batch first, so that every batch of the sample is timed; loss-curve runs keep their steps as they are
    # and leave their first step untimed.
    warm_up = val_pairs is None
    if warm_up:
        float(run_step(make([(p[:16], a[:16]) for p, a in (dataset[j] for j in order[0])]))[0])
    curve, tokens, padded, elapsed, flops = [], 0, 0, 0.0, 0
    for i, idx in enumerate(order):
        batch = make([dataset[j] for j in idx])
        t = time.perf_counter()
        loss, n_tokens = run_step(batch)
        loss = float(loss)  # the sync a logging loop makes anyway
        if warm_up or i > 0:
            elapsed += time.perf_counter() - t
            tokens += n_tokens
            padded += batch["input_ids"].numel()
            flops += training_flops(model.config, batch["attention_mask"].sum(1).tolist())
        if val_pairs is not None and (i + 1) % eval_every == 0:
            curve.append({"step": i + 1, "train_loss": loss / int((batch["labels"] != IGNORE).sum()),
                          "val_loss": _val_loss(model, val_pairs, max_length)})
    result = {"real_tokens": tokens, "padded_tokens": padded, "seconds": round(elapsed, 2),
              "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None, "curve": curve}
    if warm_up:  # throughput runs: against the peak of the precision this way computes in, here and now
        precision = hardware.Plan.default(device).precision if way == "project" else "fp32"
        peak = matmul_peak({"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32))
        result.update(precision=precision, flops_per_s=flops / elapsed, peak_flops_per_s=peak,
                      peak_fraction=flops / elapsed / peak)
    return result


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


class EndAt(LogitsProcessor):
    """Forces end-of-text once a row has `limit` new tokens, its limit looked up by its prompt's tokens."""

    def __init__(self, limits: dict, ids, mask):
        self.start = ids.shape[1]
        self.limit = torch.tensor([limits.get(tuple(r[m.bool()].tolist()), 10 ** 9) for r, m in zip(ids, mask)])

    def __call__(self, input_ids, scores):
        done = (input_ids.shape[1] - self.start) >= self.limit
        scores[done] = float("-inf")
        scores[done, EOT] = 0.0
        return scores


def stop_where_reference_ends(model, limits: dict):
    """model.generate, with each prompt's answer ending after its limit (prompts not in `limits` run free)."""
    plain = model.generate

    def generate_(input_ids, attention_mask, logits_processor=(), **kw):  # the decoding's own rules stay
        return plain(input_ids=input_ids, attention_mask=attention_mask,
                     logits_processor=[*logits_processor, EndAt(limits, input_ids, attention_mask)], **kw)
    model.generate = generate_


def answer_ways(machine: dict) -> list[str]:
    return ["textbook", "project", "default", "onednn"] + (["bf16"] if machine["native_bf16"] else [])


def run_generation_round(arch: dict, prompts_: list[list[int]], limits: list[int], ways: list[str]):
    """Every way answers the same prompts once, in the order given; the models share weights. Each way's
    FLOP/s against the matmul peak of its precision, and the weights its forward passes read per second against
    the copy bandwidth, both measured in this process after the ways (benchmarks/limits.py)."""
    models = {way: make_model(arch, way).eval() for way in ("textbook", "project")}
    stop_where_reference_ends(models["project"], {tuple(p): n for p, n in zip(prompts_, limits)})
    passes = []
    for model in models.values():  # every forward pass reads all the weights once
        model.transformer.register_forward_pre_hook(lambda *_: passes.append(1))
    # the choice is made once per process: not timed
    cpu_kernels.fastest_linears(models["project"], prompts_, pad=generate.left_pad)
    out = {}
    for way in ways:
        if way == "textbook":
            answer_all = lambda: [textbook_generate(models["textbook"], p, n) for p, n in zip(prompts_, limits)]  # noqa: E731
            answer_all_warm = lambda: textbook_generate(models["textbook"], prompts_[0], 2)  # noqa: E731
        else:
            cpu_kernels.FORCED_KERNELS = None if way == "project" else way
            answer_all = lambda: generate_ids(models["project"], prompts_, Decoding(max(limits)))  # noqa: E731
            answer_all_warm = lambda: generate_ids(models["project"], prompts_[:2], Decoding(2))  # noqa: E731
        answer_all_warm()  # not timed
        passes.clear()
        t = time.perf_counter()
        answers = answer_all()
        elapsed = time.perf_counter() - t
        answers = [a[:n] for a, n in zip(answers, limits)]
        new = sum(len(a) for a in answers)
        out[way] = {"new_tokens": new, "seconds": round(elapsed, 2), "tokens_per_s": round(new / elapsed, 1),
                    "answers": answers, "precision": "bf16" if way == "bf16" else "fp32",
                    "passes_per_s": len(passes) / elapsed,
                    "flops_per_s": answer_flops(models["project"].config, [len(p) for p in prompts_],
                                                       [len(a) for a in answers]) / elapsed}
    cpu_kernels.FORCED_KERNELS = None
    peak = peaks(sorted({out[way]["precision"] for way in ways}))
    for way in ways:
        res, config = out[way], models["project"].config
        weight_bytes = matmul_weights(config) * (2 if res["precision"] == "bf16" else 4)
        res["peak_fraction"] = res["flops_per_s"] / peak[f"matmul_{res['precision']}_flops"]
        res["bandwidth_fraction"] = res["passes_per_s"] * weight_bytes / peak["copy_bytes_per_s"]
    out["peaks"] = peak
    chosen = cpu_kernels.chosen_kernels(models["project"])
    out["chosen_kernels"] = chosen and chosen["kernels"]
    out["probe"] = chosen and chosen["measured"]
    return out


def cpu_info() -> dict:
    """The CPU's family, model and the flags that decide its fast paths (/proc/cpuinfo; empty where there is none)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "amx_int8")
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("cpu family", "model", "stepping") and key not in info:
                info[key.replace(" ", "_")] = value
            elif key == "flags":
                info["flags"] = [f for f in value.split() if f in wanted]
                break
    except OSError:
        pass
    return info


def spread(values: list[float], digits: int = 2) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "rounds": [round(v, digits) for v in values]}


def against_limits(runs: list[dict]) -> dict:
    """A way's achieved GFLOP/s and its fractions of the limits measured beside it, over the rounds."""
    out = {"precision": runs[0]["precision"],
           "gflops_per_s": spread([r["flops_per_s"] / 1e9 for r in runs], 1),
           "peak_fraction": spread([r["peak_fraction"] for r in runs], 3)}
    if "bandwidth_fraction" in runs[0]:
        out["bandwidth_fraction"] = spread([r["bandwidth_fraction"] for r in runs], 3)
    return out


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
    ap.add_argument("--quick", action="store_true", help="fewer examples and prompts, no loss curves")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every way (medians over these)")
    ap.add_argument("--shape", choices=["gpt2", "tiny"], default="gpt2",
                    help="tiny: the tiny GPT-2 everywhere, to check the script quickly (not for figures)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args(argv)
    arch = GPT2_124M if args.shape == "gpt2" else TINY
    q = args.quick
    cfg = {"train_batches": 3 if q else 20, "train_max_length": 512, "batch_size": 8,
           "train_draw": "each way's first train_batches of its epoch order over the whole train split, seeded by "
                         "the round; every one timed, after a short warm-up step",
           "gen_prompts": 8 if q else 32, "gen_new_tokens": 32 if q else 128, "rounds": args.rounds,
           "curve_steps": 0 if q else 300, "curve_max_length": 256, "curve_lr": 5e-3}
    started = time.perf_counter()
    train_df, val_df, test_df = load_splits()
    caps = hardware.capabilities(torch.device("cpu"))
    machine = {"cpu": caps.name, "cores": os.cpu_count(), "flags": [], **cpu_info(), "native_bf16": caps.native_bf16}
    results = {"quick": q, "shape": args.shape, "settings": cfg, "hardware": machine, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "training_precision": hardware.choose_precision(caps)[0],
               "note": "medians over rounds in which the ways take turns"}

    # 1. Share of real tokens, whole train split, MAX_LENGTH 1024, batch 8 (no timing: no rounds needed).
    full = batches.QADataset(train_df, 1024)
    grouped = batches.LengthGroupedBatches(full.lengths, 8, seed=123).batches(0)
    results["token_efficiency"] = {
        "project": round(batches.token_efficiency(full.lengths, grouped), 4),
        "textbook": round(batches.token_efficiency(full.lengths, textbook_batches(len(full), 8, 123)), 4),
        "examples": len(full)}
    print("token efficiency:", results["token_efficiency"], flush=True)

    # 2. Answers, GPT-2 124M architecture (random weights), test prompts, greedy, each stopped where its reference
    #    answer ends. One process per round (the ways share its weights), the order rotating per round.
    test = test_df.head(cfg["gen_prompts"])
    test_prompts = list(test["prompt_ids"])
    limits = [min(len(a), cfg["gen_new_tokens"]) for a in test["answer_ids"]]
    ways = answer_ways(machine)
    rounds = []
    for r in range(cfg["rounds"]):
        order = ways[r % len(ways):] + ways[: r % len(ways)]
        rounds.append(isolated(run_generation_round, arch, test_prompts, limits, order))
        print(f"answers, round {r + 1}:", {w: rounds[-1][w]["tokens_per_s"] for w in ways},
              "chosen:", rounds[-1]["chosen_kernels"], flush=True)
    gen = {"new_tokens": sum(limits), "limits": "min(reference answer length, gen_new_tokens) per prompt",
           "chosen_kernels": [r["chosen_kernels"] for r in rounds], "probe": rounds[0]["probe"],
           "peak_rss_mb_all_ways": max(r["peak_rss_mb"] for r in rounds),
           "peaks": [{k: round(v / 1e9, 1) for k, v in r["peaks"].items()} for r in rounds]}
    for way in ways:
        gen[way] = {"tokens_per_s": spread([r[way]["tokens_per_s"] for r in rounds]),
                    "limits": against_limits([r[way] for r in rounds])}
        if way != "textbook":
            gen[way]["over_textbook"] = spread([r[way]["tokens_per_s"] / r["textbook"]["tokens_per_s"]
                                                for r in rounds])
            gen[way]["over_default"] = spread([r[way]["tokens_per_s"] / r["default"]["tokens_per_s"]
                                               for r in rounds])
    answers = {way: rounds[0][way]["answers"] for way in ways}
    fp32 = [w for w in ways if w != "bf16"]
    n = len(test_prompts)
    same = sum(len({tuple(answers[w][i]) for w in fp32}) == 1 for i in range(n))
    gen["identical_answers_fp32_ways"] = f"{same}/{n}"
    if "bf16" in ways:
        same = sum(a == b for a, b in zip(answers["bf16"], answers["default"]))
        gen["identical_answers_bf16_vs_fp32"] = f"{same}/{n}"
    results["answers"] = gen
    args.out.write_text(json.dumps(results, indent=2) + "\n")  # kept if training is cut short

    # 3. Training throughput, GPT-2 124M architecture (random weights), batch 8, MAX_LENGTH 512: one process per
    #    way and round (its peak memory is its own), project and textbook taking turns.
    #    Each way gets its batches as an epoch over the whole train split makes them (the project's length-grouped
    #    batches, the textbook's random ones) and trains on the first few: a few dozen examples batched among
    #    themselves cannot be grouped the way a whole split is (24 examples: 0.66 to 0.86 of the tokens real in two
    #    draws, instead of 0.98), which would time a run nobody makes. The epoch order, and so the batches, change
    #    every round.
    split = batches.QADataset(train_df, 512)
    runs = {"project": [], "textbook": []}
    for r in range(cfg["rounds"]):
        for way in (("project", "textbook") if r % 2 == 0 else ("textbook", "project")):
            res = isolated(run_training, way, arch, split, 512, 8, 5e-5, 123 + r, cfg["train_batches"])
            res.pop("curve")
            runs[way].append(res)
            print(f"train {way}, round {r + 1}:", res, flush=True)
    results["training"] = {
        way: {"tokens_per_s": spread([x["tokens_per_s"] for x in runs[way]]),
              "real_over_padded_tokens": [round(x["real_tokens"] / x["padded_tokens"], 3) for x in runs[way]],
              "peak_rss_mb": max(x["peak_rss_mb"] for x in runs[way]), "limits": against_limits(runs[way]),
              "matmul_peak_gflops": [round(x["peak_flops_per_s"] / 1e9, 1) for x in runs[way]]} for way in runs}
    results["training"]["ratio"] = spread([p["tokens_per_s"] / t["tokens_per_s"]
                                           for p, t in zip(runs["project"], runs["textbook"])])

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
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(r):
    gen, tr, eff, hwr = r["answers"], r["training"], r["token_efficiency"], r["hardware"]
    med = lambda x: f"{x['median']} ({x['min']}-{x['max']})"  # noqa: E731
    rows = [("real tokens / tokens processed (MAX_LENGTH 1024, batch 8)", eff["project"], eff["textbook"], "")]
    rows.append(("training, real tokens/s (GPT-2 124M, batch 8, MAX_LENGTH 512)",
                 med(tr["project"]["tokens_per_s"]), med(tr["textbook"]["tokens_per_s"]), med(tr["ratio"])))
    rows.append(("training, peak memory (MB)", tr["project"]["peak_rss_mb"], tr["textbook"]["peak_rss_mb"], ""))
    lim = {way: tr[way]["limits"] for way in ("project", "textbook")}
    rows.append(("training, GFLOP/s (precision)", f"{med(lim['project']['gflops_per_s'])} {lim['project']['precision']}",
                 f"{med(lim['textbook']['gflops_per_s'])} {lim['textbook']['precision']}", ""))
    rows.append(("training, fraction of that precision's matmul peak", med(lim["project"]["peak_fraction"]),
                 med(lim["textbook"]["peak_fraction"]), ""))
    for way in [w for w in ("project", "default", "onednn", "bf16") if w in gen]:
        rows.append((f"answers, new tokens/s, {way}" + (f" (chose {gen['chosen_kernels']})" if way == "project" else ""),
                     med(gen[way]["tokens_per_s"]), med(gen["textbook"]["tokens_per_s"]),
                     med(gen[way]["over_textbook"])))
    for way in [w for w in ("project", "default", "onednn", "bf16") if w in gen]:
        mine, book = gen[way]["limits"], gen["textbook"]["limits"]
        rows.append((f"answers, {way}: GFLOP/s, fraction of the {mine['precision']} matmul peak",
                     f"{mine['gflops_per_s']['median']}, {med(mine['peak_fraction'])}",
                     f"{book['gflops_per_s']['median']}, {med(book['peak_fraction'])}", ""))
        rows.append((f"answers, {way}: weights read / copy bandwidth", med(mine["bandwidth_fraction"]),
                     med(book["bandwidth_fraction"]), ""))
    peak = gen["peaks"][0]
    matmul = ", ".join(f"{k.split('_')[1]} {v}" for k, v in peak.items() if k.startswith("matmul"))
    rows.append(("limits (round 1): GFLOP/s of a 2048^2 matmul; GB/s of a 1 GiB copy",
                 f"{matmul}; {peak['copy_bytes_per_s']} GB/s", "", ""))
    rows.append(("identical greedy answers, fp32 ways", gen["identical_answers_fp32_ways"], "", ""))
    if "identical_answers_bf16_vs_fp32" in gen:
        rows.append(("identical greedy answers, bf16 vs fp32", gen["identical_answers_bf16_vs_fp32"], "", ""))
    if "loss_curves" in r:
        rows.append(("tiny model, final validation loss (loss_curves.png)", r["loss_curves"]["project"]["final_val_loss"],
                     r["loss_curves"]["textbook"]["final_val_loss"], ""))
    print(f"\n{hwr['cpu']} ({hwr['cores']} cores, flags {' '.join(hwr['flags'])}), torch {r['torch']}, "
          f"{r['threads']} threads, training precision {r['training_precision']}; medians (lowest-highest) over "
          f"{r['settings']['rounds']} interleaved rounds")
    print(f"| {'measure':<66} | {'project':>20} | {'textbook':>20} | {'ratio':>20} |")
    print(f"|{'-' * 68}|{'-' * 22}|{'-' * 22}|{'-' * 22}|")
    for name, a, b, c in rows:
        print(f"| {name:<66} | {a!s:>20} | {b!s:>20} | {c!s:>20} |")


if __name__ == "__main__":
    main()

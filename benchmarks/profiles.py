"""How long the real profiles take here: a short run of each, extrapolated to the whole profile.

    python benchmarks/profiles.py                 # the cpu profile and the original laptop recipe
    python benchmarks/profiles.py --only cpu      # one of them

GPT-2's shapes with random weights ("random-gpt2", "random-gpt2-medium"): a step costs what it costs with the real
weights, whatever their values. The data is MEDQA_DATA_PATH (or data/, or a download), prepared as the notebook
prepares it. For each profile, in a fresh process (so that its peak memory is its own):

- training: the first `steps` optimizer steps of the notebook's training loader, with the project's train_step
  and the precision and memory plan train() would choose; the first step is not timed (warm-up). An epoch is
  extrapolated by padded tokens (the cost of a step grows with the tokens it processes): seconds per padded token
  x the padded tokens of all the epoch's batches; plus the epoch's validation passes, timed the same way;
- answering: `prompts` test prompts answered as the notebook answers them (the path medqa.generate picks here),
  each stopped where its reference answer ends, or at MAX_NEW_TOKENS (random weights never write end-of-text),
  extrapolated to the profile's whole test set by new tokens. The notebook answers the test set twice (before
  and after fine-tuning), plus a few single questions.

Writes benchmarks/profiles.json. On a shared machine the figures carry whatever else ran: the load average is
recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench import isolated, stop_where_reference_ends  # noqa: E402
from medqa import batches, cpu_kernels, data, generate, gpt2_tokenizer, model as gpt, settings, split, train  # noqa: E402
from medqa import hardware  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPES = {
    # the notebook's `cpu` profile with GPT-2 124M's shapes
    "cpu": dict(PROFILE="cpu", MODEL="random-gpt2"),
    # the original project's laptop recipe: GPT-2 355M, 1,100 examples, MAX_LENGTH 512, 2 epochs
    "laptop-355M": dict(PROFILE="cpu", MODEL="random-gpt2-medium", N_SAMPLES=1100),
}


def measure(recipe: dict, steps: int, n_prompts: int) -> dict:
    s = settings.resolve(recipe, env={})
    s = replace(s, OUTPUT_DIR=tempfile.mkdtemp(prefix="medqa-profile-"))
    clean, _ = data.clean(data.read_table(data.locate_data(s.DATA_PATH or os.environ.get("MEDQA_DATA_PATH"),
                                                           ROOT / "data")))
    df = batches.encode_examples(data.sample_rows(clean, s.N_SAMPLES, s.SEED), gpt2_tokenizer.get_tokenizer())
    train_df, val_df, test_df = split.split_by_question(df, s.VAL_FRACTION, s.TEST_FRACTION, s.SEED)
    train_set, val_set, test_set = (batches.QADataset(d, s.MAX_LENGTH) for d in (train_df, val_df, test_df))
    loader = batches.make_loader(train_set, s.BATCH_SIZE, s.MAX_LENGTH, shuffle=True, seed=s.SEED)
    val_loader = batches.make_loader(val_set, s.BATCH_SIZE, s.MAX_LENGTH, shuffle=False)
    device = hardware.pick_device()
    model = gpt.load_model(gpt.model_source(s.MODEL, s.SEED), device, s.DROPOUT)
    plan = train.plan_run(model, s.BATCH_SIZE, s.MAX_LENGTH, s.PRECISION)
    opt = train.make_optimizer(model, s.LEARNING_RATE, s.WEIGHT_DECAY)

    def padded(batch):
        return batch["input_ids"].numel()

    epoch = loader.batch_sampler.batches(0)
    model.train()
    timed_s, timed_tokens = 0.0, 0
    for i, idx in enumerate(epoch[:steps]):
        b = loader.collate_fn([train_set[j] for j in idx])
        t = time.perf_counter()
        loss = train.train_step(model, opt, [b], plan).loss
        float(loss)
        if i > 0:
            timed_s += time.perf_counter() - t
            timed_tokens += padded(b)
    epoch_tokens = sum(max(train_set.lengths[j] for j in idx) * len(idx) for idx in epoch)
    steps_per_epoch = len(epoch)
    # validation: EVAL_BATCHES batches every EVAL_EVERY steps and at the epoch's end
    val_batches = list(val_loader)[: s.EVAL_BATCHES]
    t = time.perf_counter()
    train.mean_loss(model, val_batches[:2], plan)
    val_rate = sum(padded(b) for b in val_batches[:2]) / (time.perf_counter() - t)
    evals = steps_per_epoch // s.EVAL_EVERY + 1
    val_s = evals * sum(padded(b) for b in val_batches) / val_rate
    train_s = epoch_tokens / (timed_tokens / timed_s)

    # answering: the first prompts of the test set, each stopped where its reference ends
    frame = test_set.frame
    limits = [min(len(a), s.MAX_NEW_TOKENS) for a in frame["answer_ids"]]
    few = list(frame["prompt_ids"][:n_prompts])
    stop_where_reference_ends(model, {tuple(p): n for p, n in zip(few, limits)})
    # The layers the notebook's call would answer on: chosen for the size of that call (the whole test set), which a
    # probe repays, and not for these few prompts, which answer on the default layers when asked on their own.
    # chooses; entering the context it returns would pack weights
    cpu_kernels.fastest_linears(model, list(frame["prompt_ids"]), s.MAX_NEW_TOKENS, pad=generate.left_pad)
    generate.generate_ids(model, few, generate.Decoding(2))  # warm-up, not timed
    t = time.perf_counter()
    answers = generate.generate_ids(model, few, generate.Decoding(s.MAX_NEW_TOKENS, batch_size=s.GEN_BATCH_SIZE,
                                                                  repetition_penalty=s.REPETITION_PENALTY))
    answer_s = time.perf_counter() - t
    new = sum(min(len(a), n) for a, n in zip(answers, limits))
    return {"model": s.MODEL, "examples": len(df), "train_examples": len(train_set), "test_examples": len(test_set),
            "max_length": s.MAX_LENGTH, "epochs": s.EPOCHS, "batch_size": s.BATCH_SIZE, "plan": plan.record(),
            "linear_kernels": (cpu_kernels.chosen_kernels(model) or {}).get("kernels", "default"),
            "timed_steps": steps - 1, "steps_per_epoch": steps_per_epoch,
            "train_padded_tokens_per_s": round(timed_tokens / timed_s, 1),
            "epoch_minutes": round((train_s + val_s) / 60, 1), "of_which_validation_minutes": round(val_s / 60, 1),
            "answer_new_tokens_per_s": round(new / answer_s, 1), "answer_prompts_timed": len(few),
            "test_set_new_tokens": sum(limits),
            "answer_test_set_minutes": round(sum(limits) / (new / answer_s) / 60, 1),
            "load_average_at_end": os.getloadavg()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(RECIPES))
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps run (the first is not timed)")
    ap.add_argument("--prompts", type=int, default=8, help="test prompts answered")
    args = ap.parse_args(argv)
    out = HERE / "profiles.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results["hardware"] = {"cpu": hardware.cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__}
    for name in [args.only] if args.only else RECIPES:
        t = time.perf_counter()
        results[name] = isolated(measure, RECIPES[name], args.steps, args.prompts)
        results[name]["measured_in_minutes"] = round((time.perf_counter() - t) / 60, 1)
        print(name, json.dumps(results[name], indent=1), flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

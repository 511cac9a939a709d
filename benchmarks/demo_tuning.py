"""Size and tune the `demo` profile, and choose its decoding, on the validation split.

    python benchmarks/demo_tuning.py train --out /tmp/cand-a --set N_SAMPLES=3000 EPOCHS=2
    python benchmarks/demo_tuning.py score --out /tmp/cand-a --split validation --n 300 \
        --decoding greedy penalty=1.2 ngram=3 penalty=1.2,ngram=4

`train` prepares the data as the notebook does (data.read_table, clean, sample_rows, encode_examples,
split.split_by_question), trains a model with train.train on the demo profile's settings changed by `--set`,
and saves it with its settings and the training time in `--out`. `score` answers the first `--n` questions
of a split with generate.answer under each decoding and prints the mean ROUGE-L F1 beside the three
reference points (reference_points.reference_answers, cut to the same MAX_NEW_TOKENS). Choose on the
validation split; score the test split once, for the chosen candidate.
A decoding is `greedy`, or comma-separated `penalty=P` (answer-only repetition penalty), `ngram=N`
(no_repeat_ngram_size over the answer) and `tokens=T` (MAX_NEW_TOKENS).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from medqa import batches, data, evaluate, generate, reference_points, settings, split, train  # noqa: E402
from medqa.gpt2_tokenizer import get_tokenizer  # noqa: E402
from medqa.model import load_model, model_source  # noqa: E402


def resolve(overrides: dict, out: Path):
    params = {"PROFILE": "demo", "OUTPUT_DIR": str(out / "run"), "OVERWRITE": True, **overrides}
    return settings.resolve(params, env={"MEDQA_DATA_PATH": os.environ["MEDQA_DATA_PATH"]}, log=lambda *_: None)


def prepare(cfg):
    """The notebook's data steps: the three splits, tokenized."""
    clean, _ = data.clean(data.read_table(data.locate_data(cfg.DATA_PATH)))
    df = batches.encode_examples(data.sample_rows(clean, cfg.N_SAMPLES, cfg.SEED, log=lambda *_: None),
                                 get_tokenizer())
    return split.split_by_question(df, cfg.VAL_FRACTION, cfg.TEST_FRACTION, cfg.SEED, log=lambda *_: None)


def do_train(args) -> None:
    overrides = {k: ast.literal_eval(v) if v[:1].isdigit() or v in ("True", "False", "None") else v
                 for k, v in (s.split("=", 1) for s in args.set)}
    if args.shape:  # a shape of its own, built as the known random-* shapes are
        from medqa.model import build_random_gpt2

        shape = {k: int(v) for k, v in (s.split("=") for s in args.shape.split(","))}
        overrides["MODEL"] = str(build_random_gpt2(args.out / "random-init", shape, overrides.get("SEED", 123)))
    cfg = resolve(overrides, args.out)
    train_df, val_df, _ = prepare(cfg)
    train_set, val_set = (batches.QADataset(d, cfg.MAX_LENGTH) for d in (train_df, val_df))
    loader = batches.make_loader(train_set, cfg.BATCH_SIZE, cfg.MAX_LENGTH, shuffle=True, seed=cfg.SEED,
                                 mask_prompt=cfg.MASK_PROMPT)
    val_sample, _ = batches.sample_examples(val_set, cfg.EVAL_BATCHES * cfg.BATCH_SIZE, cfg.SEED)
    val_loader = batches.make_loader(val_sample, cfg.BATCH_SIZE, cfg.MAX_LENGTH, shuffle=False,
                                     mask_prompt=cfg.MASK_PROMPT)
    import torch

    torch.manual_seed(cfg.SEED)
    model = load_model(model_source(cfg.MODEL, cfg.SEED), torch.device("cpu"), cfg.DROPOUT)
    started = time.perf_counter()
    history = train.train(model, loader, val_loader, train.TrainingConfig.from_settings(cfg), cfg.OUTPUT_DIR,
                          log=lambda *_: None)
    seconds = time.perf_counter() - started
    model.save_pretrained(args.out / "model")
    record = dict(overrides=overrides, train_seconds=round(seconds, 1), steps=history[-1]["step"],
                  val_loss=history[-1]["val_loss"], tokens_per_s=history[-1].get("tokens_per_s"),
                  load=os.getloadavg()[0])
    (args.out / "train.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def parse_decoding(text: str, cfg) -> generate.Decoding:
    options = dict(o.split("=") for o in text.split(",") if o != "greedy")
    return generate.Decoding(int(options.get("tokens", cfg.MAX_NEW_TOKENS)), 0.0,
                             float(options.get("penalty", 1.0)), cfg.GEN_BATCH_SIZE, cfg.SEED,
                             int(options.get("ngram", 0)))


def do_score(args) -> None:
    """Scores the saved model, or with --checkpoint the weights of a checkpoint of a run still training
    (its settings given again with --set)."""
    overrides = json.loads((args.out / "train.json").read_text())["overrides"] if not args.checkpoint else \
        {k: ast.literal_eval(v) if v[:1].isdigit() else v for k, v in (s.split("=", 1) for s in args.set)}
    cfg = resolve(overrides, args.out)
    train_df, val_df, test_df = prepare(cfg)
    frame = batches.QADataset(val_df if args.split == "validation" else test_df, cfg.MAX_LENGTH).frame
    frame = frame.head(args.n) if args.n else frame
    expected = list(frame["output"])
    import torch

    if args.checkpoint:
        from medqa.store import load_checkpoint

        model = load_model(model_source(cfg.MODEL, cfg.SEED), torch.device("cpu"))
        checkpoint = load_checkpoint(args.checkpoint)
        model.load_state_dict(checkpoint["model"])
        print(f"checkpoint at step {checkpoint['state']['step']}" if "state" in checkpoint else "checkpoint")
    else:
        model = load_model(str(args.out / "model"), torch.device("cpu"))
    tokenizer = get_tokenizer()
    for text in args.decoding:
        decoding = parse_decoding(text, cfg)
        started = time.perf_counter()
        answers = generate.answer(model, tokenizer, list(frame["prompt_ids"]), decoding)
        seconds = time.perf_counter() - started
        rouge = evaluate.summarise([s["rougeL"] for s in evaluate.rouge_scores(answers, expected)])["mean"]
        empty = sum(not a for a in answers)
        print(f"{args.split} n={len(frame)} {text:<24} ROUGE-L {rouge:.4f}  ({seconds:.0f} s, {empty} empty)",
              flush=True)
    tokens = {parse_decoding(t, cfg).max_new_tokens for t in args.decoding}
    for max_tokens in sorted(tokens):
        points = reference_points.reference_answers(train_df, frame, tokenizer, max_tokens, cfg.SEED)
        scores, _ = reference_points.score_reference_points(points, expected)
        print(f"{args.split} n={len(frame)} reference points cut to {max_tokens} tokens: " +
              ", ".join(f"{name} {s['rougeL']['mean']:.4f}" for name, s in scores.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("train", "score"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", nargs="*", default=[], help="settings over the demo profile's, NAME=VALUE")
    p.add_argument("--shape", help="a random GPT-2 shape, e.g. n_layer=8,n_head=4,n_embd=128")
    p.add_argument("--split", choices=("validation", "test"), default="validation")
    p.add_argument("--n", type=int, default=0, help="questions scored (0: all of the split)")
    p.add_argument("--decoding", nargs="*", default=["greedy"])
    p.add_argument("--checkpoint", type=Path, help="score this checkpoint.pt instead of the saved model")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (do_train if args.what == "train" else do_score)(args)


if __name__ == "__main__":
    main()

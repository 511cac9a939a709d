"""Ask a saved model questions from the command line, as the notebook answers them.

`python -m medqa.ask --model runs/cpu/model "How is gout treated?"`, or --file with one question a line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medqa import model_folder
from medqa.errors import MedQAError
from medqa.settings import COMMON, PROFILES
from medqa.store import read_json

if TYPE_CHECKING:  # medqa.generate imports torch: `--help` and bad flags answer without it
    from medqa.generate import Decoding

NOTICE = "Not medical advice: these answers come from a small language model and are often wrong."


def check_model_folder(folder) -> Path:
    """--model, checked as a saved model folder, with the fix for a run folder given instead."""
    return model_folder.check_model_folder(folder, "--model", how="point --model at OUTPUT_DIR/model of a "
                                                                  "finished run, not at OUTPUT_DIR itself")


def read_questions(questions: list[str], file: str | None) -> list[str]:
    """The questions given on the command line, then those in `file` (one a line; blank lines skipped)."""
    found = [q.strip() for q in questions if q.strip()]
    if file is not None:
        path, give = Path(file), "Give a text file with one question a line."
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MedQAError(f"--file {path}: no such file. {give}") from None
        except UnicodeDecodeError:
            raise MedQAError(f"--file {path}: not UTF-8 text. Save it as UTF-8, one question a "
                             f"line.") from None
        except OSError as err:  # a folder, a file without read permission, ...
            raise MedQAError(f"--file {path}: cannot be read ({err.strerror}). {give}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise MedQAError(f"--file {path}: the file holds no question. Write one question a line.")
        found += lines
    if not found:
        raise MedQAError("No question given: pass questions as arguments, or --file with one question a "
                         "line.")
    return found


def decoding_defaults(folder: Path) -> dict:
    """The decoding the folder's generation_config.json records, the project's defaults where it has none."""
    path = folder / "generation_config.json"
    again = "save the model folder again (export.save_model_folder, as the notebook does)"
    saved = read_json(path, f"Fix: {again}, or delete the file to use the project's defaults.") \
        if path.exists() else {}
    fix = (f"{path} does not hold the decoding settings of a saved model: {again}, or pass --max-new-tokens, "
           f"--temperature, --repetition-penalty and --no-repeat-ngram-size.")
    if not isinstance(saved, dict):
        raise MedQAError(fix)
    out = {"max_new_tokens": saved.get("max_new_tokens", PROFILES["full"]["MAX_NEW_TOKENS"]),
           "temperature": saved.get("temperature", 1.0) if saved.get("do_sample") else 0.0,
           "repetition_penalty": saved.get("answer_repetition_penalty", COMMON["REPETITION_PENALTY"]),
           "no_repeat_ngram_size": saved.get("answer_no_repeat_ngram_size", COMMON["NO_REPEAT_NGRAM_SIZE"])}
    if not (all(isinstance(out[k], int) for k in ("max_new_tokens", "no_repeat_ngram_size"))
            and all(type(out[k]) in (int, float) for k in ("temperature", "repetition_penalty"))):  # no bool
        raise MedQAError(fix)
    return out


def parse_args(argv=None):
    """The command's flags."""
    p = argparse.ArgumentParser(prog="python -m medqa.ask",
                                description=__doc__.split("\n\n")[0] + " " + NOTICE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("questions", nargs="*", help="questions to ask (quote each one)")
    p.add_argument("--model", required=True, help="the model folder a run saved: OUTPUT_DIR/model")
    p.add_argument("--file", help="a UTF-8 text file with one question a line")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: the folder's)")
    p.add_argument("--temperature", type=float, help="0: greedy; above 0: sampling (default: the folder's)")
    p.add_argument("--repetition-penalty", type=float, help="1.0 = off (default: the folder's)")
    p.add_argument("--no-repeat-ngram-size", type=int,
                   help="n: never the same n tokens in a row twice in an answer; 0 = off (default: the "
                        "folder's)")
    p.add_argument("--batch-size", type=int, default=COMMON["GEN_BATCH_SIZE"],
                   help="questions answered at once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=COMMON["SEED"],
                   help="random seed when sampling (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {question, answer} instead of text")
    return p.parse_args(argv)


def too_long(tokenizer, questions: list[str], prompts: list[list[int]], context: int, max_new_tokens: int,
             refused: list[int]) -> MedQAError:
    """The refusal of the questions (indices `refused`) leaving less than `max_new_tokens`, with the fix."""
    problems = []
    for n in refused[:3]:
        left = context - len(prompts[n])
        most = context - max_new_tokens - (len(prompts[n]) - len(tokenizer.encode_ordinary(questions[n])))
        # when no question fits beside so long an answer, shortening this one cannot help
        fix = (f"Lower --max-new-tokens to {left} or less" if most <= 0 else
               f"Shorten it{f', or lower --max-new-tokens to {left}' if left > 0 else ''}")
        problems.append(f"question {n + 1} has {len(prompts[n])} tokens with the prompt around it, and the "
                        f"model reads {context} tokens in all: with --max-new-tokens {max_new_tokens} a "
                        f"question can have at most {max(most, 0)} tokens. {fix}.")
    more = f" ({len(refused) - 3} more questions are too long.)" if len(refused) > 3 else ""
    return MedQAError(" ".join(problems) + more)


def ask(model, tokenizer, questions: list[str], decoding: Decoding, progress: bool = True) -> list[str]:
    """Answers by the notebook's recipe, all in one call as the notebook's (the same batches, kernels and
    seed); a question is answered at full length or refused, never cut."""
    from medqa import generate, prompts

    ids = [tokenizer.encode_ordinary(prompts.format_prompt(q)) for q in questions]
    context, most = model.config.n_positions, decoding.max_new_tokens
    generate.answer_room(ids, context, most, least=most,
                         refusal=lambda refused: too_long(tokenizer, questions, ids, context, most, refused))
    return generate.answer(model, tokenizer, ids, decoding, progress=progress)


def decoding_from_flags(args, saved: dict) -> Decoding:
    """The decoding the flags ask for, the folder's where a flag is not given; a bad value is refused."""
    from medqa.generate import Decoding

    given = {name: saved[name] if getattr(args, name) is None else getattr(args, name) for name in saved}
    decoding = Decoding(**given, batch_size=args.batch_size, seed=args.seed)
    temperature, penalty = decoding.temperature, decoding.repetition_penalty
    for name, ok, rule in (("max_new_tokens", decoding.max_new_tokens > 0, "above 0"),
                           ("batch_size", decoding.batch_size > 0, "above 0"),
                           ("no_repeat_ngram_size", decoding.no_repeat_ngram_size >= 0, "0 or above"),
                           ("temperature", math.isfinite(temperature) and temperature >= 0,
                            "a finite number, 0 or above"),
                           ("repetition_penalty", math.isfinite(penalty) and penalty >= 1,
                            "a finite number, 1.0 or above")):
        if not ok:
            raise MedQAError(f"--{name.replace('_', '-')} {getattr(decoding, name)}: must be {rule}.")
    return decoding


def main(argv=None) -> int:
    """Answer the questions given; the exit status is 2, with a message, for a problem the user can fix."""
    args = parse_args(argv)
    try:
        folder = check_model_folder(args.model)
        questions = read_questions(args.questions, args.file)
        decoding = decoding_from_flags(args, decoding_defaults(folder))
        from medqa import gpt2_tokenizer, hardware, model as gpt

        model = gpt.load_model(str(folder), hardware.pick_device())
        answers = ask(model, gpt2_tokenizer.get_tokenizer(), questions, decoding)
    except MedQAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"question": q, "answer": a} for q, a in zip(questions, answers)], indent=2,
                         ensure_ascii=False))
    else:
        print("".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(questions, answers)), end="")
    print(NOTICE, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ask a saved model questions from the command line, as the notebook answers them.

    python -m medqa.ask --model runs/cpu/model "What are the symptoms of glaucoma?" "How is gout treated?"
    python -m medqa.ask --model runs/cpu/model --file questions.txt      # one question per line

Same prompt (prompts.format_prompt), tokens (tiktoken's gpt2), decoding and answer cutting (generate.answer) as the
notebook; the decoding settings default to the folder's generation_config.json. On a CPU a few questions answer on
PyTorch's own layers, where the notebook's larger calls may have measured oneDNN's faster (generate.answer_path):
the two agree up to rounding, which can change a greedy answer only where two tokens are nearly tied. Not medical
advice.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

from medqa.errors import MedQAError
from medqa import settings
from medqa.settings import COMMON, PROFILES
from medqa.store import read_json

NOTICE = "Not medical advice: these answers come from a small language model and are often wrong."


def check_model_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise MedQAError(f"--model {folder}: no such folder. Point --model at OUTPUT_DIR/model of a finished run "
                         f"(the notebook's section 13 writes it).")
    if not (folder / "config.json").exists():
        raise MedQAError(f"--model {folder}: the folder holds no saved model (config.json and *.safetensors). "
                         f"Point --model at OUTPUT_DIR/model of a finished run, not at OUTPUT_DIR itself.")
    settings.check_model_folder(str(folder), label="--model")  # the notebook's own check: a GPT-2 whose weights are whole
    return folder


def read_questions(questions: list[str], file: str | None) -> list[str]:
    """The questions given on the command line, then those in `file` (one a line; blank lines skipped)."""
    found = [q.strip() for q in questions if q.strip()]
    if file is not None:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MedQAError(f"--file {path}: no such file. Give a text file with one question a line.") from None
        except UnicodeDecodeError:
            raise MedQAError(f"--file {path}: not UTF-8 text. Save it as UTF-8, one question a line.") from None
        except OSError as err:  # a folder, a file without read permission, ...
            raise MedQAError(f"--file {path}: cannot be read ({err.strerror}). Give a text file with one question "
                             f"a line.") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise MedQAError(f"--file {path}: the file holds no question. Write one question a line.")
        found += lines
    if not found:
        raise MedQAError("No question given: pass questions as arguments, or --file with one question a line.")
    return found


def decoding_defaults(folder: Path) -> dict:
    """The notebook's decoding as the folder's generation_config.json records it (the project's defaults for a
    folder saved before it had one)."""
    path = folder / "generation_config.json"
    saved = read_json(path, "Fix: save the model folder again (the notebook's section 13), or delete the file to "
                            "use the project's defaults.") if path.exists() else {}
    fix = (f"{path} does not hold the decoding settings of a saved model: save the model folder again (the "
           f"notebook's section 13), or pass --max-new-tokens, --temperature and --repetition-penalty.")
    if not isinstance(saved, dict):
        raise MedQAError(fix)
    out = {"max_new_tokens": saved.get("max_new_tokens", PROFILES["full"]["MAX_NEW_TOKENS"]),
           "temperature": saved.get("temperature", 1.0) if saved.get("do_sample") else 0.0,
           "repetition_penalty": saved.get("repetition_penalty", COMMON["REPETITION_PENALTY"])}
    if not isinstance(out["max_new_tokens"], int) or not all(
            isinstance(out[k], (int, float)) and not isinstance(out[k], bool) for k in ("temperature", "repetition_penalty")):
        raise MedQAError(fix)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m medqa.ask", description=__doc__.split("\n\n")[0] + " " + NOTICE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("questions", nargs="*", help="questions to ask (quote each one)")
    p.add_argument("--model", required=True, help="the model folder a run saved: OUTPUT_DIR/model")
    p.add_argument("--file", help="a UTF-8 text file with one question a line")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: the folder's)")
    p.add_argument("--temperature", type=float, help="0: greedy; above 0: sampling (default: the folder's)")
    p.add_argument("--repetition-penalty", type=float, help="1.0 = off (default: the folder's)")
    p.add_argument("--batch-size", type=int, default=COMMON["GEN_BATCH_SIZE"],
                   help="questions answered at once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=COMMON["SEED"], help="random seed when sampling (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {question, answer} instead of text")
    return p.parse_args(argv)


def ask(model, tokenizer, questions: list[str], s, progress: bool = True) -> list[str]:
    """Answers to `questions` through the notebook's own path: format_prompt, tokenize, generate.answer.

    All questions go to generate.answer in one call, as the notebook's do: the same batches, the same choice of
    layers for a call of that size, the same seed when sampling; its bar moves batch by batch.
    """
    from medqa.generate import answer
    from medqa.prompts import format_prompt

    prompts = [tokenizer.encode_ordinary(format_prompt(q)) for q in questions]
    return answer(model, tokenizer, prompts, s, progress=progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        folder = check_model_folder(args.model)
        questions = read_questions(args.questions, args.file)
        saved = decoding_defaults(folder)
        pick = lambda given, name: saved[name] if given is None else given  # noqa: E731
        s = SimpleNamespace(MAX_NEW_TOKENS=pick(args.max_new_tokens, "max_new_tokens"),
                            TEMPERATURE=pick(args.temperature, "temperature"),
                            REPETITION_PENALTY=pick(args.repetition_penalty, "repetition_penalty"),
                            GEN_BATCH_SIZE=args.batch_size, SEED=args.seed)
        finite = math.isfinite(s.TEMPERATURE) and math.isfinite(s.REPETITION_PENALTY)
        for flag, value, ok, rule in (("--max-new-tokens", s.MAX_NEW_TOKENS, s.MAX_NEW_TOKENS > 0, "above 0"),
                                      ("--batch-size", s.GEN_BATCH_SIZE, s.GEN_BATCH_SIZE > 0, "above 0"),
                                      ("--temperature", s.TEMPERATURE, finite and s.TEMPERATURE >= 0,
                                       "a finite number, 0 or above"),
                                      ("--repetition-penalty", s.REPETITION_PENALTY,
                                       finite and s.REPETITION_PENALTY >= 1, "a finite number, 1.0 or above")):
            if not ok:
                raise MedQAError(f"{flag} {value}: must be {rule}.")
        from medqa.gpt2_tokenizer import get_tokenizer
        from medqa.model import load_model, pick_device

        model = load_model(str(folder), pick_device())
        answers = ask(model, get_tokenizer(), questions, s)
    except MedQAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"question": q, "answer": a} for q, a in zip(questions, answers)], indent=2,
                         ensure_ascii=False))
    else:
        for q, a in zip(questions, answers):
            print(f"Q: {q}\nA: {a}\n")
    print(NOTICE, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

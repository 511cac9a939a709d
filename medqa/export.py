"""The model folder a user takes home: weights, tokenizer, decoding settings and a model card.

`OUTPUT_DIR/model` loads without this project: `AutoTokenizer.from_pretrained(folder)`,
`AutoModelForCausalLM.from_pretrained(folder)` or `pipeline("text-generation", model=folder)`. The tokenizer
gives exactly the ids tiktoken's `gpt2` encoding gave in training, and `generate` decodes as the notebook
does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from medqa import gpt2_tokenizer
from medqa.batches import EOT
from medqa.generate import AnswerOnly, Decoding, describe_decoding
from medqa.model import HUB_IDS, merge_lora
from medqa.prompts import format_prompt
from medqa.reference_points import card_table
from medqa.model_folder import RANDOM_SHAPES
from medqa.settings import RUN_DEFINING
from medqa.store import save_model_atomic

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


def _front_matter(lora_r, base: str | None, medquad: bool) -> list[str]:
    """The card's YAML front matter. For MedQuAD: license (GPT-2's weights are MIT-licensed; MedQuAD, CC
    BY 4.0, asks for the attribution the card gives), its language and datasets: lavita/MedQuAD, the hub's
    copy of the release this project reads. For other data no licence or language is claimed: they are the
    user's."""
    front = ["---"] + (["license: mit", "language:", "- en"] if medquad else [])
    front += ["library_name: transformers", "pipeline_tag: text-generation"]
    front += ["datasets:", "- lavita/MedQuAD"] if medquad else []
    front += ["tags:", "- gpt2"] + (["- medical", "- question-answering", "- medquad"] if medquad else [])
    front += ["- lora"] if lora_r else []
    front += [f"base_model: {base}"] if base else []
    return front + ["---"]


def _data_line(data: dict | None) -> tuple[str, str]:
    """What the data was, for the title and the card's Data line: MedQuAD with its citation and licence, or
    the user's own file, named, with no claim about its licence."""
    if not data:
        return "data not recorded", "not recorded."
    read = f"`{data['file']}`, {data['rows']:,} rows read"
    if not data.get("medquad"):
        return (f"{data['file']}", f"{read}: the user's own data, not MedQuAD. Its source and licence are "
                                   "whatever its owner states; this card claims none.")
    return "MedQuAD (disease questions and answers)", (
        f"MedQuAD ({read}), 47,457 question-answer pairs from 12 U.S. National Institutes of Health "
        "websites: Asma Ben Abacha and Dina Demner-Fushman, \"A "
        "Question-Entailment Approach to Question Answering\", *BMC Bioinformatics* 20, 511 (2019), "
        "https://github.com/abachaa/MedQuAD, licensed under "
        "[CC BY 4.0](https://creativecommons.org/licenses/by/4.0/).")


def _origin(cfg, base: str | None) -> str:
    """Where the weights came from, in words: a hub model, a random-weight shape, or a folder."""
    if base:
        origin = f"[{base}](https://huggingface.co/{base}), fine-tuned"
    elif cfg.MODEL in RANDOM_SHAPES:
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


def _about(cfg, origin: str, data: dict | None, split: dict) -> str:
    """The card's title and what the run was: model, data, split."""
    title, data_line = _data_line(data)
    parts = " / ".join(f"{split.get(k, 'not recorded')}" for k in ("train", "validation", "test"))
    return f"""# GPT-2 fine-tuned on {title}

> **Not medical advice.** This model's answers come from a small language model. They are often wrong and must
> never be used to diagnose or treat anyone.

- **Model**: {origin} on these question-answer pairs, written by the notebook `llm.ipynb`.
- **Data**: {data_line}
- **Split** (train / validation / test examples): {parts}; shuffled with `SEED` = {cfg.SEED}, validation
  {cfg.VAL_FRACTION:.0%} and test {cfg.TEST_FRACTION:.0%}; rows that share a question or an answer (case,
  punctuation, hyphens and spaces aside) stay in one part, so the test set neither asks what training saw nor
  expects an answer training taught."""


def _scores(scores: dict) -> str:
    """The card's scores: after and before fine-tuning, the reference points, the judge."""
    after, before = scores.get("after") or {}, scores.get("before") or {}
    rows = [f"| {name} | {_fmt(after.get(key))} | {_fmt(before.get(key))} |" for name, key in SCORES]
    note = f"\n\n{after['note']}" if after.get("note") else ""
    judged = _judged((scores.get("judge") or {}).get("test_responses.json"))
    return f"""## Scores on the test set

| score | after fine-tuning | before fine-tuning |
|---|---|---|
{chr(10).join(rows)}{note}

{card_table(scores.get("reference_points"))}

LLM judge (0-100, an Ollama model comparing each answer with the reference): {judged}.
The judge runs after this folder is saved; its score, with its sanity anchors, is in the run's `metrics.json`
(`evaluation.judge`, one result per answers file)."""


def _usage(cfg) -> str:
    """The card's settings, prompt format and how to load and ask the model."""
    settings = "\n".join(f"| `{name}` | `{getattr(cfg, name)!r}` |" for name in CARD_SETTINGS)
    example, decoding = format_prompt("What are the symptoms of glaucoma?"), Decoding.from_settings(cfg)
    return f"""## Settings of the run

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
prompt = {example!r}
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


def model_card(cfg, scores: dict | None = None, split: dict | None = None, data: dict | None = None) -> str:
    """README.md of the folder, in the Hugging Face model-card format (YAML front matter, then Markdown).

    `scores` is what metrics.json keeps under "evaluation" ({"after", "before", "reference_points", "judge"},
    the judge's results per answers file); `split` the number of examples per part ({"train", "validation",
    "test"}); `data` what was read (medqa.data.describe): MedQuAD's citation and licence appear only for
    MedQuAD. Whatever is missing reads "not measured" or "not recorded".
    """
    base = _base_model(cfg.MODEL)
    front = _front_matter(cfg.LORA_R, base, bool(data and data.get("medquad")))
    about = _about(cfg, _origin(cfg, base), data, split or {})
    return "\n".join(front) + f"\n\n{about}\n\n{_scores(scores or {})}\n\n{_usage(cfg)}"


@dataclass
class _Folder:
    """Everything the folder holds, written by `save_pretrained` into the temporary folder that
    store.save_model_atomic then swaps in, so that an interruption leaves the old folder or the new one."""

    model: object
    tokenizer: object
    generation: object
    card: str

    def save_pretrained(self, path) -> None:
        """Write every part into `path`."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.generation.save_pretrained(path)  # replaces the model's own generation_config.json
        (Path(path) / "README.md").write_text(self.card, encoding="utf-8")


def save_model_folder(model, folder, cfg, scores: dict | None = None, split: dict | None = None,
                      data: dict | None = None) -> Path:
    """Write `folder` (OUTPUT_DIR/model) atomically: the weights (LoRA adapters merged into a copy, so the
    folder loads like any GPT-2 and `model` keeps its adapters), tokenizer, generation config and model
    card (model_card: `scores`, `split`, `data`)."""
    plain = merge_lora(model)
    bundle = _Folder(plain, gpt2_tokenizer.for_transformers(plain.config.n_positions),
                     generation_config(Decoding.from_settings(cfg)), model_card(cfg, scores, split, data))
    return save_model_atomic(bundle, folder)

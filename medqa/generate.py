"""Answers from the model, many prompts at a time: batches of similar length, left-padded, decoded by
`model.generate` as `Decoding` says, cut at the first <|endoftext|>; on a CPU, medqa.cpu_kernels' kernels."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import transformers
from tqdm.std import tqdm

from medqa import cpu_kernels
from medqa.batches import EOT
from medqa.errors import MedQAError


@dataclass(frozen=True)
class Decoding:
    """How answers are generated, for the notebook, `python -m medqa.ask` and generation_config.json alike."""

    max_new_tokens: int             # longest answer, in tokens
    temperature: float = 0.0        # 0: greedy; above 0: sampling
    repetition_penalty: float = 1.0  # 1.0: off; counts the answer's own tokens, never the prompt's
    batch_size: int = 32            # prompts answered at once
    seed: int = 0                   # of the sampling, when temperature > 0
    no_repeat_ngram_size: int = 0   # 0: off; n: no n tokens in a row twice in the answer

    @classmethod
    def from_settings(cls, settings) -> Decoding:
        """The notebook's decoding settings."""
        return cls(settings.MAX_NEW_TOKENS, settings.TEMPERATURE, settings.REPETITION_PENALTY,
                   settings.GEN_BATCH_SIZE, settings.SEED, settings.NO_REPEAT_NGRAM_SIZE)

    def answer_rules(self) -> dict:
        """The rules over the answer only, as {name of transformers' logits processor: its argument}:
        `generate`'s own would count the prompt too, whose disease name a MedQuAD answer repeats."""
        rules = {}
        if self.repetition_penalty != 1.0:
            rules["RepetitionPenaltyLogitsProcessor"] = float(self.repetition_penalty)
        if self.no_repeat_ngram_size:
            rules["NoRepeatNGramLogitsProcessor"] = self.no_repeat_ngram_size
        return rules

    def config_options(self) -> dict:
        """What generation_config.json holds beside the length (`generate` ignores the answer_ options)."""
        sampling = {"temperature": self.temperature} if self.temperature > 0 else {}
        return dict(answer_repetition_penalty=self.repetition_penalty,
                    answer_no_repeat_ngram_size=self.no_repeat_ngram_size, do_sample=self.temperature > 0,
                    **sampling)

    def generate_options(self, width: int) -> dict:
        """The options of `model.generate` beside the length, for prompts left-padded to `width` columns."""
        options = {k: v for k, v in self.config_options().items() if not k.startswith("answer_")}
        rules = [getattr(transformers, name)(value) for name, value in self.answer_rules().items()]
        return dict(logits_processor=[AnswerOnly(rule, width) for rule in rules], **options)


class AnswerOnly:
    """A logits processor of transformers that sees only the answer's tokens: those after the prompt's
    `width` columns (left-padded prompts all end there)."""

    def __init__(self, processor, width):
        self.processor, self.width = processor, width

    def __call__(self, input_ids, scores):
        return self.processor(input_ids[:, self.width:], scores)


def describe_decoding(decoding: Decoding) -> str:
    """The decoding in words (the notebook prints it and metrics.json records it)."""
    way = "greedy" if decoding.temperature == 0 else f"sampling at temperature {decoding.temperature}"
    if decoding.repetition_penalty != 1.0:
        way += f" with repetition penalty {decoding.repetition_penalty}"
    if decoding.no_repeat_ngram_size:
        way += f", never the same {decoding.no_repeat_ngram_size} tokens in a row twice in an answer"
    return way


def left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask, each prompt's last token in the last column: the padding (<|endoftext|>) lies
    in the prompt's columns, which the penalty skips, so no answer depends on the prompts batched with it."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[EOT] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids.to(device), mask.to(device)


def answer_room(prompts: list[list[int]], context: int, max_new_tokens: int, least: int = 1, refusal=None,
                log=print) -> list[int]:
    """New tokens each prompt's answer may have: `max_new_tokens`, or what the context leaves when less (one
    line says so). A prompt is never cut: leaving fewer than `least`, it is refused (`refusal(indices)`)."""
    room = [min(max_new_tokens, context - len(p)) for p in prompts]
    refused = [i for i, r in enumerate(room) if r < least]
    if refused and refusal:
        raise refusal(refused)
    if refused:
        numbers = ", ".join(str(i + 1) for i in refused[:5])
        raise MedQAError(f"{len(refused)} prompt(s) (number {numbers}) have "
                         f"{max(len(prompts[i]) for i in refused)} tokens or more, and the model reads "
                         f"{context} tokens in all, prompt and answer together: no room is left for an "
                         f"answer. Shorten the question (or drop such examples, as a lower MAX_LENGTH does).")
    short = [r for r in room if r < max_new_tokens]
    if short:
        log(f"note: {len(short)} of {len(prompts)} prompts leave less than {max_new_tokens} new tokens in "
            f"the model's context of {context} tokens: their answers can have {min(short)} to {max(short)} "
            f"tokens.")
    return room


def cut_answer(new_ids: list[int]) -> list[int]:
    """The answer is everything generated before the first end-of-text."""
    return new_ids[: new_ids.index(EOT)] if EOT in new_ids else new_ids


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], decoding: Decoding, progress: bool = False,
                 log=print) -> list[list[int]]:
    """New token ids for each prompt, in the prompts' order, decoded as `decoding` says."""
    was_training = model.training  # answers between epochs must not switch dropout off for what follows
    model.eval()
    device = next(model.parameters()).device
    room = answer_room(prompts, model.config.n_positions, decoding.max_new_tokens, log=log)
    # sorted by length, for little padding; one room a batch, so that a long prompt shortens no other answer
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    same_room = [list(group) for _, group in itertools.groupby(order, key=room.__getitem__)]
    chunks = [same[start: start + decoding.batch_size] for same in same_room
              for start in range(0, len(same), decoding.batch_size)]
    out: list[list[int]] = [[] for _ in prompts]
    if decoding.temperature > 0:
        torch.manual_seed(decoding.seed)
    try:
        with cpu_kernels.fastest_linears(model, prompts, decoding.max_new_tokens, pad=left_pad):
            for chunk in tqdm(chunks, desc="answering", unit="batch",
                              disable=not progress or len(chunks) < 2):
                ids, mask = left_pad([prompts[i] for i in chunk], device)
                new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=room[chunk[0]],
                                     eos_token_id=EOT, pad_token_id=EOT,
                                     **decoding.generate_options(ids.shape[1]))
                for i, row in zip(chunk, new[:, ids.shape[1]:].tolist()):
                    out[i] = cut_answer(row)
    finally:  # an interrupted answer must not leave dropout off either
        model.train(was_training)
    return out


def clean_answer(text: str) -> str:
    """The answer's text without a "### Response:" header that the model echoed, the ends stripped."""
    return text.replace("### Response:", "").strip()


def answer(model, tokenizer, prompts: list[list[int]], decoding: Decoding,
           progress: bool = False) -> list[str]:
    """Decoded answers for tokenized prompts."""
    return [clean_answer(tokenizer.decode(r)) for r in generate_ids(model, prompts, decoding, progress)]


def response_records(frame, answers: list[str]) -> list[dict]:
    """What test_responses.json holds: each test example, MedQuAD's source and focus area, and its answer."""
    return [{"instruction": r.instruction, "input": r.input, "output": r.output, "source": r.source,
             "focus_area": r.focus_area, "model_response": a}
            for r, a in zip(frame.itertuples(index=False), answers, strict=True)]

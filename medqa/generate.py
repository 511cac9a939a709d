"""Answers from the model, many prompts at a time: sort the prompts by length and batch them, pad each batch
on the left, let `model.generate` decode with its KV cache (as one small object, `Decoding`, says), and keep
what comes before the first <|endoftext|>. On the CPU the linear layers run on the kernels that
medqa.cpu_kernels measured fastest here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from tqdm.std import tqdm

from medqa import cpu_kernels
from medqa.batches import EOT
from medqa.errors import MedQAError


@dataclass(frozen=True)
class Decoding:
    """How answers are generated: the notebook's settings (from_settings), `python -m medqa.ask`'s flags, and
    the saved folder's generation_config.json (export.generation_config) all go through it. A new decoding
    option is a field here and an entry in config_options."""

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
        """The options that look at the answer only, as the names of transformers' logits processors and their
        argument. `generate`'s own repetition_penalty and no_repeat_ngram_size would count the prompt too, and
        a MedQuAD answer repeats its question's disease name and words ("The signs and symptoms of ...")."""
        rules = {}
        if self.repetition_penalty != 1.0:
            rules["RepetitionPenaltyLogitsProcessor"] = float(self.repetition_penalty)
        if self.no_repeat_ngram_size:
            rules["NoRepeatNGramLogitsProcessor"] = self.no_repeat_ngram_size
        return rules

    def config_options(self) -> dict:
        """What generation_config.json holds beside the length: do_sample and temperature, which `generate`
        reads, and the answer's rules under names of their own, which it ignores and medqa.ask reads."""
        sampling = dict(do_sample=True, temperature=self.temperature) if self.temperature > 0 else \
            dict(do_sample=False)
        return dict(answer_repetition_penalty=self.repetition_penalty,
                    answer_no_repeat_ngram_size=self.no_repeat_ngram_size, **sampling)

    def generate_options(self, width: int) -> dict:
        """The options of `model.generate` beside the length, for prompts left-padded to `width` columns."""
        import transformers

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
    """Left padding puts every prompt's last token in the last column, where generation continues. The
    padding (<|endoftext|>) lies in the prompt's columns, which the penalty skips: a prompt's answer does not
    depend on the prompts batched with it (tests/test_model.py)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), EOT, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def answer_room(prompts: list[list[int]], context: int, max_new_tokens: int, least: int = 1, refusal=None,
                log=print) -> list[int]:
    """How many new tokens each prompt's answer may have: `max_new_tokens`, or what the context leaves after
    the prompt when that is less (one line says so). A prompt is never cut: one that leaves fewer than `least`
    tokens is refused, with the MedQAError that `refusal` makes of their indices (by default no_room's)."""
    room = [min(max_new_tokens, context - len(p)) for p in prompts]
    refused = [i for i, r in enumerate(room) if r < least]
    if refused:
        raise (refusal or (lambda found: no_room(prompts, context, found)))(refused)
    short = [r for r in room if r < max_new_tokens]
    if short:
        log(f"note: {len(short)} of {len(prompts)} prompts leave less than {max_new_tokens} new tokens in "
            f"the model's context of {context} tokens: their answers can have {min(short)} to {max(short)} "
            f"tokens.")
    return room


def no_room(prompts: list[list[int]], context: int, full: list[int]) -> MedQAError:
    """The notebook's refusal of the prompts (indices `full`) that fill the model's context."""
    numbers = ", ".join(str(i + 1) for i in full[:5])
    return MedQAError(f"{len(full)} prompt(s) (number {numbers}) have {max(len(prompts[i]) for i in full)} "
                      f"tokens or more, and the model reads {context} tokens in all, prompt and answer "
                      f"together: no room is left for an answer. Shorten the question (or drop such "
                      f"examples, as a lower MAX_LENGTH does).")


def batches_of_equal_room(prompts: list[list[int]], room: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts in batches of up to `batch_size`, sorted by length so that little padding is
    computed; a batch only holds prompts with the same room, so a long prompt never shortens the answers
    batched with it."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = []
    for _, group in itertools.groupby(order, key=room.__getitem__):  # sorted by length: equal rooms adjoin
        same = list(group)
        chunks += [same[start: start + batch_size] for start in range(0, len(same), batch_size)]
    return chunks


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
    chunks = batches_of_equal_room(prompts, room, decoding.batch_size)
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


RESPONSE_HEADER = "### Response:"


def clean_answer(text: str) -> str:
    """The answer's text without a "### Response:" header that the model echoed, as the textbook recipe does:
    the header is removed, the text around it kept, and the ends stripped."""
    return text.replace(RESPONSE_HEADER, "").strip()


def answer(model, tokenizer, prompts: list[list[int]], decoding: Decoding,
           progress: bool = False) -> list[str]:
    """Decoded answers for tokenized prompts."""
    return [clean_answer(tokenizer.decode(r)) for r in generate_ids(model, prompts, decoding, progress)]


def response_records(frame, answers: list[str]) -> list[dict]:
    """What test_responses.json holds: each test example (with MedQuAD's source and focus area) beside the
    model's answer."""
    return [{"instruction": r.instruction, "input": r.input, "output": r.output, "source": r.source,
             "focus_area": r.focus_area, "model_response": a}
            for r, a in zip(frame.itertuples(index=False), answers, strict=True)]

"""Step 8 and 11: answers from the model, many prompts at a time, with `model.generate` and its KV cache."""

from __future__ import annotations

import torch

from medqa.batches import EOT


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding puts every prompt's last token in the last column, where generation continues."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), EOT, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def cut_answer(new_ids: list[int]) -> list[int]:
    """The answer is everything generated before the first end-of-text."""
    return new_ids[: new_ids.index(EOT)] if EOT in new_ids else new_ids


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
                 temperature: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0) -> list[list[int]]:
    """New token ids for each prompt, in the prompts' order; greedy when temperature is 0.

    Prompts are batched by length so that little padding is computed.
    """
    model.eval()
    device = next(model.parameters()).device
    context = model.config.n_positions
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    if temperature > 0:
        torch.manual_seed(seed)
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        rows = [prompts[i][-(context - 1):] for i in chunk]  # a prompt never fills the whole context
        ids, mask = _left_pad(rows, device)
        room = min(max_new_tokens, context - ids.shape[1])
        sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 \
            else dict(do_sample=False)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=room, eos_token_id=EOT,
                             pad_token_id=EOT, repetition_penalty=repetition_penalty, **sampling)
        for i, row in zip(chunk, gen[:, ids.shape[1]:].tolist()):
            out[i] = cut_answer(row)
    return out


def answer(model, tokenizer, prompts: list[list[int]], s) -> list[str]:
    """Decoded answers for tokenized prompts, with the generation settings of `s`."""
    ids = generate_ids(model, prompts, s.MAX_NEW_TOKENS, s.GEN_BATCH_SIZE, s.TEMPERATURE,
                       s.REPETITION_PENALTY, s.SEED)
    return [tokenizer.decode(r).strip() for r in ids]


def response_records(frame, answers: list[str]) -> list[dict]:
    """What test_responses.json holds: each test example beside the model's answer."""
    return [{"instruction": r.instruction, "input": r.input, "output": r.output, "model_response": a}
            for r, a in zip(frame.itertuples(index=False), answers, strict=True)]

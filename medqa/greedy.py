"""Greedy decoding written out: how `model.generate` makes an answer, token by token, with the KV cache."""

import torch

from medqa.batches import EOT


@torch.no_grad()
def greedy_tokens(model, prompt: list[int], max_new_tokens: int, eos: int = EOT):
    """Yield the answer's tokens as they are made: each the most likely next token, until `eos` or the limit.

    The first pass reads the whole prompt; after that the model reads only the newest token, and
    `past_key_values` (the KV cache) holds every earlier token's keys and values, so a step costs one token.
    """
    was_training = model.training
    model.eval()  # no dropout while answering
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    past = None
    try:
        for _ in range(min(max_new_tokens, model.config.n_positions - len(prompt))):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            if token == eos:
                return
            yield token
            ids = ids.new_tensor([[token]])
    finally:
        model.train(was_training)

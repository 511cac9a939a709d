"""Step 8 and 11: answers from the model, many prompts at a time, with `model.generate` and its KV cache."""

from __future__ import annotations

import itertools
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from tqdm.std import tqdm
from transformers.pytorch_utils import Conv1D

from medqa.batches import EOT

# What a private oneDNN op may raise, above all where torch is not the pinned version (Colab's, say): AttributeError
# for an op that this build does not have (torch.ops.mkldnn._no_such_op), NotImplementedError for one without a CPU
# kernel (a RuntimeError in Python, named for the reader), RuntimeError for one that refuses its inputs ("could not
# create a primitive descriptor", under bf16 autocast).
PRIVATE_OP_ERRORS = (RuntimeError, AttributeError, NotImplementedError)


class OneDNNLinear(torch.nn.Module):
    """y = x W^T + b computed by oneDNN, on its own copy of the weight, packed once in oneDNN's blocked layout.

    The two ops are those torch.compile's CPU backend emits for linear layers; they are internal to PyTorch (hence
    the underscores and the pinned torch), and tests/test_speed.py checks that this layer computes what the model's
    own layers do. Where either op fails (PRIVATE_OP_ERRORS), the layer is PyTorch's own from then on.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):  # weight: (out, in)
        super().__init__()
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.contiguous())
        except PRIVATE_OP_ERRORS:
            self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == torch.float32:
            try:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            except PRIVATE_OP_ERRORS:  # private ops, no promises: PyTorch's layer from now on
                self.packed = None
        return F.linear(x, self.weight, self.bias)  # PyTorch's own layer: the same product up to rounding, any dtype


class BF16Linear(torch.nn.Module):
    """y = x W^T + b on a bf16 copy of the weight (fp32 in, fp32 out): for CPUs that compute bf16 natively."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight.detach().to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


@contextmanager
def _swapped_linears(model, layer):
    """While inside, every linear layer of the model is `layer(weight (out, in), bias)`; the model's own layers
    come back on exit, error or not."""
    swaps = []
    for path, parent in model.named_modules():
        if "lora_" in path:  # peft's LoRA adapters: their layer reads their weights directly, and they are small
            continue
        for name, child in parent.named_children():
            if isinstance(child, Conv1D):  # GPT-2 keeps these weights as (in, out)
                swaps.append((parent, name, child, layer(child.weight.t(), child.bias)))
            elif isinstance(child, torch.nn.Linear):
                swaps.append((parent, name, child, layer(child.weight, child.bias)))
    try:
        for parent, name, _, fast in swaps:
            setattr(parent, name, fast)
        yield model
    finally:
        for parent, name, child, _ in swaps:
            setattr(parent, name, child)


def _fp32_on_cpu(model) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32


@contextmanager
def onednn_linears(model):
    """While inside, the fp32 linear layers of a model on the CPU run on oneDNN instead of MKL.

    PyTorch sends fp32 matrix products on the CPU to MKL, whose kernels for a few rows at a time (one new token per
    prompt) are slow on some processors, and not on others: answer_path measures which wins on this machine.
    oneDNN does the same fp32 arithmetic up to rounding (its sums run in another order: GPT-2's logits differ by a
    few millionths). The packed weights are a copy (about 0.5 GB for GPT-2 124M), held only while inside. A layer
    whose oneDNN op fails falls back to PyTorch's own product.
    Elsewhere (CUDA, bf16 weights, no oneDNN, or `torch.backends.mkldnn.enabled = False`) the model is left as is.
    """
    if not (_fp32_on_cpu(model) and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        yield model
        return
    with _swapped_linears(model, OneDNNLinear):
        yield model


# ---------------------------------------------------------------- which way answers fastest here

PATHS = {"default": nullcontext, "onednn": onednn_linears, "bf16": lambda m: _swapped_linears(m, BF16Linear)}
FORCED_PATH: str | None = None  # benchmarks set this to time one way on its own
_CHOSEN: dict = {}  # (model shape, paths, threads) -> (path, measurements)
MARGIN = 1.05  # another path must beat PyTorch's default by 5% to be chosen: never slower than the default
PROBE_PROMPTS, PROBE_TOKENS, PROBE_ROUNDS = 4, 16, 3
PROBE_PAYBACK = 20  # a call is probed only if its work is this many times the probe's (worth_probing)


def candidate_paths(model) -> list[str]:
    """The ways answer_path may choose between: PyTorch's default fp32 layers always, and oneDNN's fp32 layers where
    oneDNN is on. Both do the same fp32 arithmetic up to rounding (a few millionths on the logits), which can flip a
    greedy choice where two tokens are nearly tied: the fp32 ways gave identical answers in the benchmark's runs (8 of
    8, benchmarks/results.json), but that is measured, not guaranteed.

    bf16 copies of the weights (PATHS["bf16"], where the CPU computes bf16 natively) are faster on some CPUs but
    change answers (6 of 8 greedy answers equal to fp32 in benchmarks/bench.py on random weights): a notebook and a
    later `python -m medqa.ask` should give the same text, so bf16 runs only when FORCED_PATH asks for it."""
    if not _fp32_on_cpu(model):
        return ["default"]
    paths = ["default"]
    if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        paths.append("onednn")
    return paths


def _probe(model, path: str, ids, mask) -> tuple[float, list]:
    with PATHS[path](model):
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=PROBE_TOKENS, min_new_tokens=PROBE_TOKENS,
                             do_sample=False, pad_token_id=EOT, eos_token_id=EOT)
        return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()


def measure_paths(model, prompts: list[list[int]]) -> dict:
    """A few greedy decoding steps of every candidate path on the model itself and (the first of) the prompts it
    is about to answer, interleaved (A B C A B C ...) so that a busy moment hurts every path alike.

    Returns each path's median seconds, whether its tokens equal the default's, or the error that ruled it out.
    """
    # whole prompts: bf16 must agree on what will be answered (on cut prompts it agreed where whole ones did not)
    rows = [p[-(model.config.n_positions - PROBE_TOKENS):] for p in prompts[:PROBE_PROMPTS]]
    ids, mask = _left_pad(rows, next(model.parameters()).device)
    seconds: dict[str, list[float]] = {}
    tokens, failed = {}, {}
    for _ in range(PROBE_ROUNDS):
        for path in candidate_paths(model):
            if path in failed:
                continue
            try:
                took, tokens[path] = _probe(model, path, ids, mask)
            except PRIVATE_OP_ERRORS as err:  # a private op that this torch (or an outer autocast) does not take
                failed[path] = str(err).splitlines()[0][:200]
                continue
            seconds.setdefault(path, []).append(took)
    return {path: {"seconds": statistics.median(times), "same_tokens": tokens[path] == tokens.get("default")}
            for path, times in seconds.items()} | {path: {"error": err} for path, err in failed.items()}


def choose_path(measured: dict) -> str:
    """The fastest path that beats PyTorch's default by MARGIN; bf16 only if its greedy tokens in the probe equal
    fp32's too (bf16 rounds the logits: where two tokens are nearly tied it may pick the other one)."""
    default = measured["default"]["seconds"]
    best, best_s = "default", default / MARGIN
    for path, m in measured.items():
        ok = "seconds" in m and (path != "bf16" or m["same_tokens"])
        if ok and m["seconds"] < best_s:
            best, best_s = path, m["seconds"]
    return best


def worth_probing(n_paths: int, n_prompts: int, max_new_tokens: int) -> bool:
    """Whether a call of `n_prompts` answers of up to `max_new_tokens` is large enough to pay for a probe.

    Work is counted as prompts x new tokens. The probe's is PROBE_ROUNDS x paths x PROBE_PROMPTS x PROBE_TOKENS (384
    with two paths), all of it spent before the first answer, on 4 rows a decoding step, where the call decodes up
    to 32: a probe's prompt-token costs about 3 times a call's (GPT-2 124M on 2 cores, PyTorch's default layers:
    0.10 s a step for 4 rows, 0.15 s for 16, 0.27 s for 32). At PROBE_PAYBACK (20) times the probe's work, where no
    way beats the default, the probe adds about 15% to the first such call of the process (a 10-second probe before
    32 answers of 240 tokens, 65 s) and less to larger ones; where oneDNN wins (1.8 times the default in the
    benchmark) that call takes about 45 s, probe included. Smaller calls, such as a few questions to
    `python -m medqa.ask` in a fresh process, answer on the default layers: a probe could make them much slower
    than PyTorch's default.
    """
    probe = PROBE_ROUNDS * n_paths * PROBE_PROMPTS * PROBE_TOKENS
    return n_prompts * max_new_tokens >= PROBE_PAYBACK * probe


def answer_path(model, prompts: list[list[int]], max_new_tokens: int | None = None):
    """The context in which this model answers fastest here: measured once per model shape, process and thread
    count (a few greedy steps of each way on PROBE_PROMPTS whole prompts), then reused, so that a reloaded copy of a
    model answers the same way. A call too small to repay the probe (worth_probing) answers on the default layers
    until a larger call has measured; `max_new_tokens` None asks for the choice whatever it costs (the benchmarks
    make it before they time anything). `FORCED_PATH` overrides the choice."""
    if FORCED_PATH is not None:
        return PATHS[FORCED_PATH](model)
    paths = candidate_paths(model)
    small = max_new_tokens is not None and not worth_probing(len(paths), len(prompts), max_new_tokens)
    if paths == ["default"] or (_key(model) not in _CHOSEN and small):
        return nullcontext(model)  # nothing to choose, or a probe would cost more than it can save here
    if _key(model) not in _CHOSEN:
        measured = measure_paths(model, prompts)
        _CHOSEN[_key(model)] = (choose_path(measured), measured)
    return PATHS[_CHOSEN[_key(model)][0]](model)


def _key(model) -> tuple:
    c = model.config
    return (c.n_layer, c.n_embd, c.n_head, c.vocab_size, tuple(candidate_paths(model)), torch.get_num_threads())


def chosen_path(model) -> dict | None:
    """What answer_path chose for this model's shape here and what it measured (None: nothing to choose or not
    yet answered), for the notebook and the benchmarks."""
    path, measured = _CHOSEN.get(_key(model), (None, None))
    return None if path is None else {"path": path, "measured": measured}


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding puts every prompt's last token in the last column, where generation continues.

    The padding is <|endoftext|>, which the repetition penalty would count as said: `generate` keeps it out, since
    it gives the penalty each row's padding length from the attention mask (transformers 5, generation/utils.py),
    so a prompt's answer does not depend on the prompts batched with it (tests/test_model.py checks this).
    """
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


RESPONSE_HEADER = "### Response:"


def clean_answer(text: str) -> str:
    """The answer's text without a "### Response:" header that the model echoed, as the textbook recipe does:
    the header is removed, the text around it kept, and the ends stripped."""
    return text.replace(RESPONSE_HEADER, "").strip()


def describe_decoding(s) -> str:
    """The decoding the settings ask for, in words (the notebook prints it and metrics.json records it)."""
    way = "greedy" if s.TEMPERATURE == 0 else f"sampling at temperature {s.TEMPERATURE}"
    return way if s.REPETITION_PENALTY == 1.0 else f"{way} with repetition penalty {s.REPETITION_PENALTY}"


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
                 temperature: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0,
                 progress: bool = False) -> list[list[int]]:
    """New token ids for each prompt, in the prompts' order; greedy when temperature is 0.

    Prompts are batched by length so that little padding is computed; on the CPU the linear layers run the way
    that answer_path measured fastest on this machine. Each answer gets `max_new_tokens`, or what the context
    leaves after its own prompt when that is less: a batch only holds prompts with the same room, so that a long
    prompt never shortens the answers batched with it.
    """
    was_training = model.training  # answers between epochs must not switch dropout off for the rest of training
    model.eval()
    device = next(model.parameters()).device
    context = model.config.n_positions
    rows = [p[-(context - 1):] for p in prompts]  # a prompt never fills the whole context
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    room = [min(max_new_tokens, context - len(r)) for r in rows]
    chunks = []
    for _, group in itertools.groupby(order, key=room.__getitem__):  # sorted by length: equal rooms are adjacent
        same = list(group)
        chunks += [same[s: s + batch_size] for s in range(0, len(same), batch_size)]
    out: list[list[int]] = [[] for _ in prompts]
    if temperature > 0:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    try:
        with answer_path(model, prompts, max_new_tokens):
            for chunk in tqdm(chunks, desc="answering", unit="batch", disable=not progress or len(chunks) < 2):
                ids, mask = _left_pad([rows[i] for i in chunk], device)
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=room[chunk[0]],
                                     eos_token_id=EOT, pad_token_id=EOT, repetition_penalty=repetition_penalty,
                                     **sampling)
                for i, row in zip(chunk, gen[:, ids.shape[1]:].tolist()):
                    out[i] = cut_answer(row)
    finally:  # an interrupted answer must not leave dropout off either
        model.train(was_training)
    return out


def answer(model, tokenizer, prompts: list[list[int]], s, progress: bool = False) -> list[str]:
    """Decoded answers for tokenized prompts, with the generation settings of `s`."""
    ids = generate_ids(model, prompts, s.MAX_NEW_TOKENS, s.GEN_BATCH_SIZE, s.TEMPERATURE,
                       s.REPETITION_PENALTY, s.SEED, progress)
    return [clean_answer(tokenizer.decode(r)) for r in ids]


def response_records(frame, answers: list[str]) -> list[dict]:
    """What test_responses.json holds: each test example (with MedQuAD's source and focus area) beside the model's
    answer."""
    return [{"instruction": r.instruction, "input": r.input, "output": r.output, "source": r.source,
             "focus_area": r.focus_area, "model_response": a}
            for r, a in zip(frame.itertuples(index=False), answers, strict=True)]

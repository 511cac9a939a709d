"""Talking to Ollama: where it runs, one chat request through its official client, the one reading of the
client's errors, and the score read from a reply."""

from __future__ import annotations

import json
import os
import re
import urllib.parse

from medqa.errors import MedQAError

# Ollama constrains the reply to this schema; read_score still parses free text, for models that ignore it.
SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
                "required": ["score"]}
DEFAULT_HOST = "http://localhost:11434"
OLLAMA_PORT = 11434          # the port Ollama listens on when an address names none
REPLY_TOKENS = 128           # room for the chat template and the reply (num_predict caps the reply)
DEFAULT_CONTEXT = 8192       # when the server does not say the model's context length (llama3's)
# "0-100", "(0 - 100)", "from 0 to 100", "between 0 and 100": the scale, not the score.
_SCALE = re.compile(r"\(?\s*(?:from\s+|between\s+)?\b0\s*(?:-|–|to|and)\s*100\b\s*\)?", re.I)
_FRACTION = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)\s*(?:/|out of)\s*(\d+)(?![\w.]?\d)", re.I)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)")


class JudgeUnavailable(Exception):
    """Ollama cannot judge at all (not reachable, model not pulled); the message says how to fix it."""


class Unscored(Exception):
    """One request gave no score; the message is the reason it is counted under."""


class Transient(Unscored):
    """A failure worth another try (a server error, a dropped connection)."""


def check_ollama_host(value, name: str = "OLLAMA_HOST") -> str:
    """Where Ollama runs, as the URL the judge connects to; a MedQAError names `name`, the problem and the
    fix. A bare host or host:port gets http:// (and port 11434 when it names none), as Ollama reads it."""
    def bad(problem: str) -> MedQAError:
        return MedQAError(f"{name}={value!r} {problem}: set it to where Ollama runs, e.g. {DEFAULT_HOST!r}"
                          + (" (or None for the default)." if name == "OLLAMA_HOST" else "."))

    if not isinstance(value, str):
        raise bad("is not text")
    if not value.strip():
        raise bad("is empty")
    if any(c.isspace() for c in value):
        raise bad("holds a space or another blank")
    scheme, sep, rest = value.partition("://")
    if not sep:
        if re.match(r"^https?:/", value, re.I):
            raise bad("lacks the two slashes after its scheme")
        scheme, rest = "http", value
    if scheme.lower() not in ("http", "https"):
        raise bad(f"uses the scheme {scheme + '://'!r}, and Ollama speaks http:// or https://")
    try:
        parts = urllib.parse.urlsplit(f"{scheme.lower()}://{rest}")
    except ValueError:  # "Invalid IPv6 URL"
        raise bad("opens a bracket that does not close") from None
    try:
        port = parts.port
    except ValueError:  # "Port could not be cast to integer value", "Port out of range 0-65535"
        raise bad("has a port that is not a number from 1 to 65535") from None
    # The client adds /api/<endpoint> itself: "http://localhost:11434/api/generate", copied from Ollama's
    # docs, would ask /api/api/generate/api/show, whose 404 reads as a model that is not pulled.
    refusals = ((not parts.hostname, "names no host"), (port == 0, "has port 0, which no server listens on"),
                (parts.username is not None or parts.query or parts.fragment or "?" in rest or "#" in rest,
                 "holds more than a host, a port and a path"),
                (re.search(r"(^|/)api(/[^/]*)?$", parts.path.rstrip("/"), re.I),
                 f"ends in Ollama's API path {parts.path!r}, which the judge adds itself; give only the "
                 "server's address"))
    for refused, problem in refusals:
        if refused:
            raise bad(problem)
    netloc = parts.netloc + (f":{OLLAMA_PORT}" if not sep and port is None else "")
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def read_score(content) -> tuple[int | None, str]:
    """The judge's score and how it was read ("json" or "text"), or None and why not. Free text is read with
    care: the scale is not a score, "75/100" is; another scale ("8/10") or two candidates are refused."""
    text = (content or "").strip()
    if not text:
        return None, "empty reply"
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and "score" in obj:
        value = obj["score"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _in_range(value, "json")
        text = str(value)
    return _from_text(text)


def _from_text(text: str) -> tuple[int | None, str]:
    text = _SCALE.sub(" ", text)
    fractions = _FRACTION.findall(text)
    if any(float(denominator) != 100 for _, denominator in fractions):
        return None, "score on another scale"
    candidates = {float(n) for n, _ in fractions} or {float(n) for n in _NUMBER.findall(text)}
    if not candidates:
        return None, "no score in reply"
    if len(candidates) > 1:
        return None, "ambiguous reply"
    return _in_range(candidates.pop(), "text")


def _in_range(value: float, how: str) -> tuple[int | None, str]:
    if not float(value).is_integer():
        return None, "score not a whole number"
    if not 0 <= value <= 100:
        return None, "score out of range"
    return int(value), how


def tokens_needed(prompt: str) -> int:
    """The context a request needs: about 3 characters a token (safe for English), plus the reply."""
    return len(prompt) // 3 + REPLY_TOKENS


def context_size(prompts: list[str], limit: int) -> int:
    """num_ctx for the whole run: the longest prompt's need as a power of two from 2048, at most `limit`. One
    size, as Ollama reloads the model when num_ctx changes; its default context cuts long references."""
    needed = max((tokens_needed(p) for p in prompts), default=REPLY_TOKENS)
    return min(max(2048, 1 << (needed - 1).bit_length()), limit)


def client(host: str, timeout_s: float):
    """An ollama client for `host` whose requests time out after `timeout_s`. Importing ollama builds one from
    $OLLAMA_HOST, with a bare ValueError on a bad value: the variable is checked first, to say the fix."""
    if os.environ.get("OLLAMA_HOST"):
        check_ollama_host(os.environ["OLLAMA_HOST"], "OLLAMA_HOST (an environment variable)")
    import ollama

    return ollama.Client(host=host, timeout=timeout_s)


def failure(err: Exception) -> str:
    """What went wrong in a call of the ollama client, in a word or two: the one reading of its errors."""
    import httpx
    import ollama
    import pydantic

    if isinstance(err, ConnectionError):
        return "connection refused"
    if isinstance(err, ollama.ResponseError):
        return "no model" if err.status_code == 404 else f"HTTP {err.status_code}"
    if isinstance(err, httpx.TimeoutException):
        return "timeout"
    if isinstance(err, httpx.TransportError):
        return f"connection failed ({type(err).__name__})"
    if isinstance(err, json.JSONDecodeError):
        return "reply not JSON"
    if isinstance(err, (pydantic.ValidationError, TypeError)):
        return "unexpected reply shape"
    return f"unexpected error ({type(err).__name__})"


def check_model(host: str, model: str, timeout_s: float) -> tuple[int, bool]:
    """Fail fast, before the progress bar: is Ollama there, does it have the model? Returns the model's
    context length and whether it thinks before answering."""
    try:
        with client(host, timeout_s) as connection:
            shown = connection.show(model)
    except MedQAError as err:
        raise JudgeUnavailable(str(err).rstrip(".")) from None
    except Exception as err:  # noqa: BLE001 -- whatever the host does, the run must go on
        reason = failure(err)
        said = {"connection refused": f"Ollama is not reachable at {host}: start it with `ollama serve` (and "
                                      f"`ollama pull {model}`), or set OLLAMA_HOST to where it runs",
                "no model": f"Ollama at {host} has no model {model!r}: run `ollama pull {model}` (or check "
                            f"that OLLAMA_HOST points at Ollama)",
                "timeout": f"{host} accepted the connection but did not answer within {timeout_s:g} s: is "
                           f"Ollama running there, and not stuck?"}.get(reason)
        if said is None and reason.startswith("HTTP"):
            said = f"Ollama at {host} answered {reason} ({err.error}) when asked about model {model!r}"
        said = said or f"{host} did not answer like Ollama ({type(err).__name__}: {err})"
        raise JudgeUnavailable(said) from None
    lengths = [v for k, v in (shown.modelinfo or {}).items()
               if k.endswith(".context_length") and isinstance(v, int)]
    return (lengths[0] if lengths else DEFAULT_CONTEXT), "thinking" in (shown.capabilities or [])


def ask(connection, host: str, model: str, prompt: str, options: dict, think) -> tuple[int | None, str]:
    """One chat request; a score (or None) and how it was read. A failure raises JudgeUnavailable where no
    further request can succeed, Transient where another try may, and Unscored otherwise."""
    try:
        reply = connection.chat(model, messages=[{"role": "user", "content": prompt}], format=SCORE_SCHEMA,
                                options=options, think=think)
    except Exception as err:  # noqa: BLE001 -- the judge is optional: count it, never raise into the run
        reason = failure(err)
        if reason == "connection refused":
            raise JudgeUnavailable(f"Ollama stopped answering at {host} (connection refused): start it again "
                                   f"with `ollama serve`") from None
        if reason == "no model":
            raise JudgeUnavailable(f"Ollama at {host} no longer has model {model!r}: run "
                                   f"`ollama pull {model}`") from None
        # A timeout is not tried again: a server that hangs once mostly hangs again.
        worth_a_retry = reason.startswith("connection failed") or reason.startswith("HTTP") and (
            reason == "HTTP 429" or int(reason.split()[1]) >= 500)
        raise (Transient if worth_a_retry else Unscored)(reason) from None
    return read_score(reply.message.content)

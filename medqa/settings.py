"""Step 1: resolve the notebook's settings from its parameters cell, `MEDQA_<NAME>` variables and a profile.

Precedence, highest first: a value set in the parameters cell (or injected by papermill), the environment
variable `MEDQA_<NAME>`, the profile's default. `None` in the parameters cell means "not set here".
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medqa import store
from medqa.errors import MedQAError

GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
TINY_MODEL = "tiny"  # a small random GPT-2 built locally (smoke profile); never reported as GPT-2
# GPT-2's shapes with random weights, built locally: they cost what the real models cost (timings, memory) and
# answer noise. For measuring without a network; never reported as GPT-2 results.
RANDOM_MODELS = ("random-gpt2-mini", "random-gpt2", "random-gpt2-medium")
PRECISIONS = ("bf16", "fp16", "fp32")

PROFILES = {
    # No network: a tiny random GPT-2 and a few hundred examples, to check the whole notebook runs.
    "smoke": dict(MODEL=TINY_MODEL, N_SAMPLES=200, MAX_LENGTH=256, EPOCHS=1, LEARNING_RATE=5e-3,
                  WARMUP_STEPS=2, EVAL_EVERY=5, EVAL_BATCHES=4, MAX_NEW_TOKENS=32, N_BEFORE=3),
    # No network, about 15 minutes on a 2-core CPU: a small GPT-2 shape trained from random weights, to show learning.
    # MASK_PROMPT: a model that starts from nothing spends its few steps on the answers, not on the preamble.
    "demo": dict(MODEL="random-gpt2-mini", N_SAMPLES=3000, MAX_LENGTH=128, EPOCHS=2, LEARNING_RATE=2e-3,
                 WARMUP_STEPS=30, EVAL_EVERY=40, EVAL_BATCHES=4, MAX_NEW_TOKENS=64, N_BEFORE=3, MASK_PROMPT=True),
    # A laptop with a network: GPT-2 124M on about 1,000 examples.
    "cpu": dict(MODEL="gpt2", N_SAMPLES=1000, MAX_LENGTH=512, EPOCHS=2, LEARNING_RATE=5e-5,
                WARMUP_STEPS=10, EVAL_EVERY=20, EVAL_BATCHES=10, MAX_NEW_TOKENS=200, N_BEFORE=3),
    # A GPU: GPT-2 355M on all of MedQuAD.
    "full": dict(MODEL="gpt2-medium", N_SAMPLES=None, MAX_LENGTH=1024, EPOCHS=2, LEARNING_RATE=5e-5,
                 WARMUP_STEPS=100, EVAL_EVERY=100, EVAL_BATCHES=20, MAX_NEW_TOKENS=256, N_BEFORE=3),
}

# Where MedQuAD comes from when DATA_PATH is not set (see medqa/data.py).
DEFAULT_OUTPUT_ROOT = "runs"


@dataclass(frozen=True)
class Settings:
    PROFILE: str
    MODEL: str
    DATA_PATH: str | None
    N_SAMPLES: int | None
    MAX_LENGTH: int
    BATCH_SIZE: int
    GRAD_ACCUM: int
    EPOCHS: int
    LEARNING_RATE: float
    WEIGHT_DECAY: float
    WARMUP_STEPS: int
    DROPOUT: float
    LORA_R: int | None
    LORA_ALPHA: int | None
    PRECISION: str | None
    MAX_STEPS: int | None
    EVAL_EVERY: int
    EVAL_BATCHES: int
    CHECKPOINT_EVERY: int
    MASK_PROMPT: bool
    VAL_FRACTION: float
    TEST_FRACTION: float
    SEED: int
    MAX_NEW_TOKENS: int
    GEN_BATCH_SIZE: int
    TEMPERATURE: float
    REPETITION_PENALTY: float
    N_BEFORE: int
    BASELINE_EVAL: bool
    JUDGE_MODEL: str
    JUDGE_BUDGET_S: float
    OLLAMA_HOST: str
    OUTPUT_DIR: str
    OVERWRITE: bool

    def show(self) -> None:
        width = max(len(f.name) for f in fields(self))
        for name, value in asdict(self).items():
            print(f"{name:<{width}} = {value!r}")


# Defaults shared by every profile; a profile's own entries override these.
COMMON = dict(DATA_PATH=None, BATCH_SIZE=8, GRAD_ACCUM=1, WEIGHT_DECAY=0.1, DROPOUT=0.0, LORA_R=None,
              LORA_ALPHA=None, PRECISION=None, MAX_STEPS=None,
              CHECKPOINT_EVERY=200, MASK_PROMPT=False, VAL_FRACTION=0.10, TEST_FRACTION=0.05, SEED=123,
              GEN_BATCH_SIZE=32, TEMPERATURE=0.0, REPETITION_PENALTY=1.1, BASELINE_EVAL=True,
              JUDGE_MODEL="llama3", JUDGE_BUDGET_S=3600.0, OLLAMA_HOST="http://localhost:11434", OUTPUT_DIR=None, OVERWRITE=False)

# Settings that change what training produces: a resumed run must agree on all of them.
RUN_DEFINING = ("MODEL", "DATA_PATH", "N_SAMPLES", "MAX_LENGTH", "BATCH_SIZE", "GRAD_ACCUM", "EPOCHS",
                "LEARNING_RATE", "WEIGHT_DECAY", "WARMUP_STEPS", "DROPOUT", "LORA_R", "LORA_ALPHA", "EVAL_EVERY", "EVAL_BATCHES", "MASK_PROMPT",
                "VAL_FRACTION", "TEST_FRACTION", "SEED")


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "True or False", "str": "text"}


def _field_type(name: str) -> str:
    return {f.name: f.type for f in fields(Settings)}[name]


def _example(name: str):
    """A valid value of the setting, for messages."""
    return next((p[name] for p in (COMMON, *PROFILES.values()) if p.get(name) is not None), None)


def _parse_env(name: str, text: str):
    """Turn the text of `MEDQA_<name>` into the setting's type."""
    kind = _field_type(name)
    text = text.strip()
    if "None" in kind and text.lower() in ("", "none", "null"):
        return None
    try:
        if kind.startswith("bool"):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise MedQAError(f"MEDQA_{name}={text!r} is not a yes/no value: set it to 1, true or yes for True, "
                             f"or 0, false or no for False.")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise MedQAError(f"MEDQA_{name}={text!r} is not {_TYPE_WORDS[kind.split(' ')[0]]}: "
                         f"set it to a value like {_example(name)!r}.") from None
    return text


def default_profile() -> str:
    """`full` on any CUDA GPU (train() plans micro-batches so that it fits, down to a 16 GB T4), else `cpu`.

    A 16 GB Mac (MPS) gets `cpu`: `full` would fit it only one row at a time (medqa.device.plan_memory)."""
    from medqa import device

    return "full" if device.pick_device().type == "cuda" else "cpu"


def resolve(params: dict, env: dict | None = None) -> Settings:
    """Combine the parameters cell (`params`, upper-case names), `MEDQA_*` variables and the profile."""
    env = os.environ if env is None else env
    names = [f.name for f in fields(Settings)]
    unknown = sorted(k for k in params if k not in names)
    if unknown:
        raise MedQAError(f"Unknown setting(s) {unknown}: the settings are {names}.")
    unknown_env = sorted(k for k in env if k.startswith("MEDQA_") and k[6:] not in names)
    if unknown_env:
        raise MedQAError(f"Unknown environment variable(s) {unknown_env}: "
                         f"use MEDQA_<NAME> with NAME one of {names}.")

    def given(name):
        if params.get(name) is not None:
            return True, params[name]
        if f"MEDQA_{name}" in env:
            return True, _parse_env(name, env[f"MEDQA_{name}"])
        return False, None

    has_profile, profile = given("PROFILE")
    profile = profile if has_profile and profile is not None else default_profile()
    if not isinstance(profile, str) or profile not in PROFILES:
        raise MedQAError(f"PROFILE={profile!r} is unknown: choose one of {sorted(PROFILES)}.")
    values = {**COMMON, **PROFILES[profile], "PROFILE": profile}
    for name in names:
        has, value = given(name)
        if has:
            values[name] = value
    if not given("OLLAMA_HOST")[0] and env.get("OLLAMA_HOST"):
        values["OLLAMA_HOST"] = env["OLLAMA_HOST"]  # Ollama's own variable
    if values["OUTPUT_DIR"] is None:
        values["OUTPUT_DIR"] = f"{DEFAULT_OUTPUT_ROOT}/{profile}"
    _check_types(values)
    for name in ("MODEL", "OUTPUT_DIR", "DATA_PATH"):  # "~/runs" means the home folder, not a folder named "~"
        if isinstance(values[name], str) and values[name].startswith("~"):
            values[name] = os.path.expanduser(values[name])
    if "://" not in values["OLLAMA_HOST"]:
        values["OLLAMA_HOST"] = "http://" + values["OLLAMA_HOST"]  # Ollama accepts a bare host:port
    settings = Settings(**values)
    validate(settings)
    return settings


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MedQAError(message)


def _check_types(values: dict) -> None:
    """Every setting has its declared type: papermill's `-p OVERWRITE maybe` gives a string, `-p BATCH_SIZE 8.0`
    a float, and Python counts True as the whole number 1."""
    for f in fields(Settings):
        value, base, nullable = values[f.name], f.type.split(" | ")[0], "None" in f.type
        if value is None and nullable:
            continue
        ok = {"int": isinstance(value, numbers.Integral) and not isinstance(value, bool),
              "float": isinstance(value, numbers.Real) and not isinstance(value, bool),
              "bool": isinstance(value, bool),
              "str": isinstance(value, str)}.get(base, True)
        if ok:
            continue
        if base == "bool":
            raise MedQAError(f"{f.name}={value!r} must be True or False (papermill: -p {f.name} True; in the "
                             f"environment: MEDQA_{f.name}=1, true or yes, or 0, false or no).")
        if base == "int" and isinstance(value, numbers.Real) and not isinstance(value, bool) \
                and math.isfinite(value) and value == int(value):
            raise MedQAError(f"{f.name}={value!r} must be a whole number: write {int(value)} without the decimal "
                             f"point.")
        raise MedQAError(f"{f.name}={value!r} ({type(value).__name__}) must be {_TYPE_WORDS[base]}"
                         f"{' or None' if nullable else ''}, e.g. {_example(f.name)!r}.")


def _check_output_dir(value: str) -> None:
    """OUTPUT_DIR can become the run's folder: nothing is written here, so a failed run leaves no trace."""
    _check(value.strip() != "", "OUTPUT_DIR='' names no folder (the run would write into the current folder): "
                                "set it to a folder such as 'runs/mine', or None for runs/<PROFILE>.")
    _check("\x00" not in value, f"OUTPUT_DIR={value!r} holds a NUL character, which no folder name can: "
                                 f"set it to a folder such as 'runs/mine'.")
    path = Path(value)
    try:
        path.exists()
    except OSError as err:
        raise MedQAError(f"OUTPUT_DIR={value[:80]!r}... cannot be a folder ({err.strerror}): set it to a shorter "
                         f"folder such as 'runs/mine'.") from None
    _check(not path.exists() or path.is_dir(),
           f"OUTPUT_DIR={value!r} is a file, not a folder: set OUTPUT_DIR to a folder (it is created if missing).")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    _check(existing.is_dir(), f"OUTPUT_DIR={value!r} lies under {str(existing)!r}, which is a file: "
                              f"set OUTPUT_DIR to a folder.")
    _check(os.access(existing, os.W_OK | os.X_OK),
           f"OUTPUT_DIR={value!r} cannot be written: {str(existing)!r} is read-only for you. Make it writable "
           f"(chmod u+w) or set OUTPUT_DIR to a folder you can write.")


def check_model_folder(value: str, label: str = "MODEL") -> None:
    """A model folder holds GPT-2 weights that load: checked from config.json and the weight files' headers and
    sizes, in well under a second, instead of failing after the data is prepared."""
    folder, known = Path(value), GPT2_MODELS + (TINY_MODEL,) + RANDOM_MODELS
    how = f"point MODEL at a folder saved with save_pretrained from a GPT-2 model, or use one of {list(known)}"
    _check((folder / "config.json").is_file(),
           f"{label}={value!r} is a folder without config.json, so it was not saved with save_pretrained (or the copy "
           f"is incomplete): {how}.")
    config = store.read_json(folder / "config.json", f"Fix: {how}.")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    _check(model_type == "gpt2", f"{label}={value!r} holds a {model_type!r} model (config.json), not GPT-2: this "
                                 f"notebook fine-tunes GPT-2 with GPT-2's tokenizer and context; {how}.")
    weights = [p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin") and p.is_file()]
    _check(bool(weights), f"{label}={value!r} holds no weights (model.safetensors or pytorch_model.bin): {how}.")
    for p in weights:
        problem = store.safetensors_problem(p) if p.suffix == ".safetensors" else store.zip_problem(p)
        _check(problem is None, f"{label}={value!r}: {p.name} {problem}; the copy is damaged or incomplete. Copy or "
                                f"save the folder again, or {how[0].lower() + how[1:]}.")


def validate(s: Settings) -> None:
    """Reject values out of range before anything is read, trained or written."""
    _check_types(asdict(s))
    for f in fields(Settings):
        value = getattr(s, f.name)
        _check(not (f.type.startswith("float") and value is not None and not math.isfinite(value)),
               f"{f.name}={value!r} is not a finite number: use a value like {_example(f.name)!r}.")
    for name in ("MODEL", "JUDGE_MODEL", "OLLAMA_HOST"):
        _check(getattr(s, name).strip() not in ("", "http://"),
               f"{name}={getattr(s, name)!r} is empty: set it to a value like {_example(name)!r}, or None for the default.")
    known = GPT2_MODELS + (TINY_MODEL,) + RANDOM_MODELS
    if s.MODEL not in known and not Path(s.MODEL).is_dir():
        raise MedQAError(f"MODEL={s.MODEL!r} is neither a known model nor an existing folder: choose one of "
                         f"{list(known)} or the path of a folder saved with save_pretrained.")
    if s.MODEL not in known:
        check_model_folder(s.MODEL)
    _check(0 <= s.SEED < 2**32, f"SEED={s.SEED!r} must lie between 0 and 2**32 - 1 (numpy's range), e.g. 123.")
    _check_output_dir(s.OUTPUT_DIR)
    if s.MODEL not in known:  # a run writes its files (and model/) into OUTPUT_DIR: never into the model it loads
        model, out = Path(s.MODEL).resolve(), Path(s.OUTPUT_DIR).resolve()
        _check(model != out and model not in out.parents,
               f"OUTPUT_DIR={s.OUTPUT_DIR!r} is the MODEL folder {s.MODEL!r} (or inside it): the run would write into "
               f"the model it loads. Set OUTPUT_DIR to another folder, e.g. 'runs/mine'.")
    for name in ("BATCH_SIZE", "GRAD_ACCUM", "EPOCHS", "EVAL_EVERY", "EVAL_BATCHES", "CHECKPOINT_EVERY",
                 "GEN_BATCH_SIZE", "MAX_NEW_TOKENS"):
        value = getattr(s, name)
        _check(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive whole number.")
    for name in ("N_SAMPLES", "MAX_STEPS"):
        value = getattr(s, name)
        _check(value is None or (isinstance(value, int) and value > 0),
               f"{name}={value!r} must be a positive whole number, or None for all.")
    _check(isinstance(s.MAX_LENGTH, int) and s.MAX_LENGTH >= 64,
           f"MAX_LENGTH={s.MAX_LENGTH!r} is too short for any prompt: the Alpaca preamble alone takes about "
           f"40 tokens; use at least 64 (the profiles use 256 to 1024).")
    _check(s.LEARNING_RATE > 0, f"LEARNING_RATE={s.LEARNING_RATE!r} must be positive (e.g. 5e-5).")
    _check(0 <= s.DROPOUT < 1, f"DROPOUT={s.DROPOUT!r} must lie in [0, 1) (0 = off).")
    _check(s.WEIGHT_DECAY >= 0, f"WEIGHT_DECAY={s.WEIGHT_DECAY!r} must be zero or positive.")
    _check(isinstance(s.WARMUP_STEPS, int) and s.WARMUP_STEPS >= 0, f"WARMUP_STEPS={s.WARMUP_STEPS!r} must be >= 0.")
    for name in ("LORA_R", "LORA_ALPHA"):
        value = getattr(s, name)
        _check(value is None or (isinstance(value, int) and value > 0),
               f"{name}={value!r} must be a positive whole number (e.g. 16), or None (LORA_R: full fine-tuning).")
    _check(s.PRECISION is None or s.PRECISION in PRECISIONS,
           f"PRECISION={s.PRECISION!r} is unknown: choose one of {list(PRECISIONS)}, or None to pick by hardware.")
    _check(s.JUDGE_BUDGET_S > 0, f"JUDGE_BUDGET_S={s.JUDGE_BUDGET_S!r} must be a positive number of seconds.")
    _check(s.TEMPERATURE >= 0, f"TEMPERATURE={s.TEMPERATURE!r} must be >= 0 (0 = greedy).")
    _check(s.REPETITION_PENALTY >= 1.0, f"REPETITION_PENALTY={s.REPETITION_PENALTY!r} must be >= 1.0 (1.0 = off).")
    _check(isinstance(s.N_BEFORE, int) and s.N_BEFORE >= 0, f"N_BEFORE={s.N_BEFORE!r} must be >= 0.")
    for name in ("VAL_FRACTION", "TEST_FRACTION"):
        value = getattr(s, name)
        _check(0 < value < 1, f"{name}={value!r} must lie between 0 and 1 so that the split is not empty.")
    _check(s.VAL_FRACTION + s.TEST_FRACTION < 1,
           f"VAL_FRACTION + TEST_FRACTION = {s.VAL_FRACTION + s.TEST_FRACTION} leaves no training data: "
           f"keep their sum below 1 (default 0.10 + 0.05).")


def run_signature(s: Settings) -> dict:
    return {name: getattr(s, name) for name in RUN_DEFINING}


# What claim_output_dir records beside the settings: what the data file and the model source were.
FINGERPRINTS = {"DATA_FINGERPRINT": "the data file", "MODEL_FINGERPRINT": "the model (MODEL's weights)"}


def _run_problems(out: Path, mine: dict) -> list[str]:
    """Why the run in OUTPUT_DIR cannot simply continue as the run `mine`: other settings, changed inputs, damage."""
    record = out / "run.json"
    if not record.exists():
        left = [name for name in store.RUN_FILES if (out / name).exists()]
        return [f"files of a run without run.json ({', '.join(left)})"] if left else []
    problems = []
    try:
        theirs = store.read_json(record, "")
        if not isinstance(theirs, dict):
            raise MedQAError(f"{record} holds no JSON object")
    except MedQAError as err:
        problems.append(f"a damaged run.json ({str(err).split(': it was')[0]})")
        theirs = None
    if theirs is not None:
        differ = [f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in mine.items()
                  if k not in FINGERPRINTS and theirs.get(k) != v]
        if differ:
            problems.append(f"other settings ({', '.join(differ)})")
        problems += [f"{what} changed since that run began ({theirs[k]} there, {mine[k]} now)"
                     for k, what in FINGERPRINTS.items() if k in theirs and k in mine and theirs[k] != mine[k]]
    if (out / "checkpoint.pt").is_file() and (problem := store.zip_problem(out / "checkpoint.pt")):
        problems.append(f"a damaged checkpoint.pt (it {problem})")
    if (out / "metrics.json").is_file():
        try:
            store.read_json(out / "metrics.json", "")
        except MedQAError as err:
            problems.append(f"a damaged metrics.json ({str(err).split(': it was')[0]})")
    return problems


def _never_discard_inputs(out: Path, data_file, model_source) -> None:
    """OVERWRITE replaces a run of this notebook, never the user's own files: refuse when the folder holds no
    run.json (its files are not a run's), or when this run's data file or model lies where a run's files go."""
    if not (out / "run.json").exists():
        raise MedQAError(f"OUTPUT_DIR={str(out)!r} holds files named like a run's but no run.json, so they are not a "
                         f"run of this notebook and OVERWRITE=True does not delete them: set OUTPUT_DIR to another "
                         f"folder (or move those files away).")
    discarded = [(out / name).resolve() for name in store.RUN_FILES]
    for label, source in (("DATA_PATH", data_file), ("MODEL", model_source)):
        if source is None or not Path(source).exists():
            continue
        inside = Path(source).resolve()
        if any(inside == d or d in inside.parents for d in discarded):
            raise MedQAError(f"{label}={str(source)!r} lies inside OUTPUT_DIR={str(out)!r} where the old run's files "
                             f"are, and OVERWRITE=True would delete it: copy it elsewhere (or set OUTPUT_DIR to another "
                             f"folder) first.")


def claim_output_dir(s: Settings, data_file=None, model_source=None) -> Path:
    """Make OUTPUT_DIR this run's: the last step before the run writes its first file there.

    Call it after the data is read and cleaned and the model is loaded, so that a run that fails any of those
    checks leaves OUTPUT_DIR as it was and records nothing. It records the run's settings and the fingerprints
    of `data_file` and `model_source` (see store.fingerprint) in run.json. A run there with other settings,
    other data or another model, or with damaged files, is refused, or with OVERWRITE=True replaced.
    """
    out = Path(s.OUTPUT_DIR)
    mine = run_signature(s)
    for key, source in (("DATA_FINGERPRINT", data_file), ("MODEL_FINGERPRINT", model_source)):
        if source is not None:
            mine[key] = store.fingerprint(source)
    problems = _run_problems(out, mine) if out.is_dir() else []
    if problems and s.OVERWRITE:
        _never_discard_inputs(out, data_file, model_source)
    if problems and not s.OVERWRITE:
        raise MedQAError(f"OUTPUT_DIR={s.OUTPUT_DIR!r} holds a run this one cannot continue: {'; '.join(problems)}. "
                         f"To keep it, set OUTPUT_DIR to another folder; to replace it, set OVERWRITE=True.")
    if out.is_dir():
        store.discard_run(out, litter_only=not problems)
    store.write_json_atomic(out / "run.json", mine)
    return out

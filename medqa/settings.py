"""Resolve the notebook's settings from its parameters cell, `MEDQA_<NAME>` variables and a profile.

Precedence, highest first: a value set in the parameters cell (or injected by papermill), the environment
variable `MEDQA_<NAME>`, the profile's default. `None` in the parameters cell means "not set here".
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medqa import run_folder, setting_names
from medqa.errors import MedQAError
from medqa.store import on_read_only_mount, update_json, url_scheme
from medqa.model_folder import KNOWN_MODELS, TINY_MODEL, check_model_folder

PRECISIONS = ("bf16", "fp16", "fp32")

PROFILES = {
    # No network: a tiny random GPT-2 and a few hundred examples, to check the whole notebook runs.
    "smoke": dict(MODEL=TINY_MODEL, N_SAMPLES=200, MAX_LENGTH=256, EPOCHS=1, LEARNING_RATE=5e-3,
                  WARMUP_STEPS=2, EVAL_EVERY=5, EVAL_BATCHES=4, MAX_NEW_TOKENS=32, N_BEFORE=3),
    # No network: a small GPT-2 shape trained from random weights on a CPU, to show learning.
    # MASK_PROMPT: a model that starts from nothing spends its few steps on the answers, not on the preamble.
    # 6,000 examples seen once by 8 layers (the output layer, 50257 x 128, costs most of a step, so depth
    # is cheap); fp32 on every CPU, so that the stored run's losses reproduce on CPUs without bf16
    # (docs/speed.md).
    "demo": dict(MODEL="random-gpt2-mini-deep", N_SAMPLES=6000, MAX_LENGTH=128, EPOCHS=1, LEARNING_RATE=2e-3,
                 WARMUP_STEPS=30, EVAL_EVERY=40, EVAL_BATCHES=4, MAX_NEW_TOKENS=64, N_BEFORE=3,
                 MASK_PROMPT=True, PRECISION="fp32"),
    # A laptop with a network: GPT-2 124M on about 1,000 examples.
    "cpu": dict(MODEL="gpt2", N_SAMPLES=1000, MAX_LENGTH=512, EPOCHS=2, LEARNING_RATE=5e-5,
                WARMUP_STEPS=10, EVAL_EVERY=20, EVAL_BATCHES=10, MAX_NEW_TOKENS=200, N_BEFORE=3),
    # A GPU: GPT-2 355M on all of MedQuAD.
    "full": dict(MODEL="gpt2-medium", N_SAMPLES=None, MAX_LENGTH=1024, EPOCHS=2, LEARNING_RATE=5e-5,
                 WARMUP_STEPS=100, EVAL_EVERY=100, EVAL_BATCHES=20, MAX_NEW_TOKENS=256, N_BEFORE=3),
}

# Where a run writes when OUTPUT_DIR is not set: runs/<PROFILE>.
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
    NO_REPEAT_NGRAM_SIZE: int
    N_BEFORE: int
    BASELINE_EVAL: bool
    JUDGE_MODEL: str
    JUDGE_BUDGET_S: float
    OLLAMA_HOST: str
    OUTPUT_DIR: str
    OVERWRITE: bool

    def show(self) -> None:
        """Print every setting, one a line."""
        width = max(len(f.name) for f in fields(self))
        for name, value in asdict(self).items():
            print(f"{name:<{width}} = {value!r}")


# Defaults shared by every profile; a profile's own entries override these.
COMMON = dict(DATA_PATH=None, BATCH_SIZE=8, GRAD_ACCUM=1, WEIGHT_DECAY=0.1, DROPOUT=0.0, LORA_R=None,
              LORA_ALPHA=None, PRECISION=None, MAX_STEPS=None,
              CHECKPOINT_EVERY=200, MASK_PROMPT=False, VAL_FRACTION=0.10, TEST_FRACTION=0.05, SEED=123,
              GEN_BATCH_SIZE=32, TEMPERATURE=0.0, REPETITION_PENALTY=1.0, NO_REPEAT_NGRAM_SIZE=3,
              BASELINE_EVAL=True,
              JUDGE_MODEL="llama3", JUDGE_BUDGET_S=3600.0, OLLAMA_HOST="http://localhost:11434",
              OUTPUT_DIR=None, OVERWRITE=False)

# Settings that change what training produces: a resumed run must agree on all of them.
RUN_DEFINING = ("MODEL", "DATA_PATH", "N_SAMPLES", "MAX_LENGTH", "BATCH_SIZE", "GRAD_ACCUM", "EPOCHS",
                "LEARNING_RATE", "WEIGHT_DECAY", "WARMUP_STEPS", "DROPOUT", "LORA_R", "LORA_ALPHA",
                "EVAL_EVERY", "EVAL_BATCHES", "MASK_PROMPT",
                "VAL_FRACTION", "TEST_FRACTION", "SEED")


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "True or False", "str": "text"}


def _field_type(name: str) -> str:
    return {f.name: f.type for f in fields(Settings)}[name]


# Values for messages, for the settings no profile sets to anything but None.
EXAMPLES = {"LORA_R": 16, "LORA_ALPHA": 32, "MAX_STEPS": 100}


def _example(name: str):
    """A valid value of the setting, for messages."""
    given = (p[name] for p in (COMMON, *PROFILES.values()) if p.get(name) is not None)
    return next(given, EXAMPLES.get(name))


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
            raise MedQAError(f"MEDQA_{name}={text!r} is not a yes/no value: set it to 1, true or yes for "
                             f"True, or 0, false or no for False.")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise MedQAError(f"MEDQA_{name}={text!r} is not {_TYPE_WORDS[kind.split(' ')[0]]}: "
                         f"set it to a value like {_example(name)!r}.") from None
    return text


def default_profile() -> str:
    """The profile for PROFILE=None on this machine (profile_choice says why)."""
    return profile_choice()[0]


def profile_choice() -> tuple[str, str]:
    """`full` on a CUDA GPU where gpt2-medium's training fits the free memory, else `cpu`, and why in words
    (medqa.hardware.choose_profile). A 16 GB Mac (MPS) gets `cpu`: `full` would fit it only one row at a time.
    When the GPU's memory cannot be read, `full`: train() plans micro-batches so that it fits."""
    from medqa import hardware

    where = hardware.pick_device()
    if where.type != "cuda":
        return "cpu", f"no CUDA GPU ({where.type}): GPT-2 124M on 1,000 examples"
    try:
        caps = hardware.capabilities(where)
    except (RuntimeError, AssertionError):  # a driver that cannot report its memory
        return "full", "a CUDA GPU whose free memory cannot be read: train() plans micro-batches to fit"
    return hardware.choose_profile(caps)


def notebook_params(namespace: dict) -> dict:
    """The settings the notebook's parameters cell gave, from its `globals()`, with papermill's injected cell.

    A name given there that the run would not use (papermill's `-p LEARNIN_RATE 1e-4` injects
    `LEARNIN_RATE = 0.0001` after the parameters cell and only warns) is refused, naming the setting it
    resembles: upper-case names close to a setting's, any name in papermill's injected cell, and a setting's
    name in other capitals (`learning_rate`) holding a plain value."""
    names = [f.name for f in fields(Settings)]
    setting_names.refuse_strays(namespace, names)
    return {k: v for k, v in namespace.items() if k in names}


def resolve(params: dict, env: dict | None = None, log=print) -> Settings:
    """Combine the parameters cell (`params`, upper-case names), `MEDQA_*` variables and the profile."""
    env = os.environ if env is None else env
    names = [f.name for f in fields(Settings)]
    setting_names.refuse_unknown(params, env, names)

    def given(name):
        if params.get(name) is not None:
            return True, params[name]
        if f"MEDQA_{name}" in env:
            return True, _parse_env(name, env[f"MEDQA_{name}"])
        return False, None

    has_profile, profile = given("PROFILE")
    if not has_profile or profile is None:
        profile, why = profile_choice()
        log(f"PROFILE not set: {profile!r} for this machine ({why}).")
    if not isinstance(profile, str) or profile not in PROFILES:
        close = setting_names.closest(profile, PROFILES)
        raise MedQAError(f"PROFILE={profile!r} is unknown{f' (did you mean {close!r}?)' if close else ''}: "
                         f"choose one of {sorted(PROFILES)}.")
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
    for name in ("MODEL", "OUTPUT_DIR", "DATA_PATH"):  # "~/runs" is in the home folder, not in a folder "~"
        if isinstance(values[name], str) and values[name].startswith("~"):
            values[name] = os.path.expanduser(values[name])
    from medqa.ollama_api import check_ollama_host  # before any work, not in the judge after training

    values["OLLAMA_HOST"] = check_ollama_host(values["OLLAMA_HOST"])
    settings = Settings(**values)
    validate(settings)
    return settings


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MedQAError(message)


def _check_types(values: dict) -> None:
    """Every setting has its declared type: papermill's `-p OVERWRITE maybe` gives a string, `-p BATCH_SIZE
    8.0` a float, and Python counts True as the whole number 1."""
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
            raise MedQAError(f"{f.name}={value!r} must be a whole number: write {int(value)} without the "
                             f"decimal point.")
        if isinstance(value, str) and base != "str":
            _refuse_text(f.name, value, base, nullable)
        raise MedQAError(f"{f.name}={value!r} ({type(value).__name__}) must be {_TYPE_WORDS[base]}"
                         f"{' or None' if nullable else ''}, e.g. {_example(f.name)!r}.")


def _refuse_text(name: str, value: str, base: str, nullable: bool) -> None:
    """A number or True/False given as text ("8" in quotes, or papermill's -r): the fix names the type and
    writes the value without quotes, for the cell and for papermill."""
    try:
        meant = _parse_env(name, value)
    except MedQAError:
        meant = None
    meant = meant if meant is not None else _example(name)
    raise MedQAError(f"{name}={value!r} is text (str), but {name} must be {_TYPE_WORDS[base]}"
                     f"{' or None' if nullable else ''}: write it without quotes, e.g. {name} = {meant!r} in "
                     f"the parameters cell (papermill: -p {name} {meant!r}).")


def _check_output_dir(value: str) -> None:
    """OUTPUT_DIR can become the run's folder: nothing is written here, so a failed run leaves no trace."""
    _check(value.strip() != "",
           "OUTPUT_DIR='' names no folder (the run would write into the current folder): "
                                "set it to a folder such as 'runs/mine', or None for runs/<PROFILE>.")
    _check("\x00" not in value, f"OUTPUT_DIR={value!r} holds a NUL character, which no folder name can: "
                                 f"set it to a folder such as 'runs/mine'.")
    _check(url_scheme(value) is None,
           f"OUTPUT_DIR={value!r} is a URL: a run writes into a folder on this machine. Set OUTPUT_DIR to a "
           f"local folder (on Colab a mounted Drive folder such as '/content/drive/MyDrive/runs' works), and "
           f"copy the folder to that storage when the run has ended.")
    path = Path(value)
    try:
        path.exists()
    except OSError as err:
        raise MedQAError(f"OUTPUT_DIR={value[:80]!r}... cannot be a folder ({err.strerror}): set it to a "
                         f"shorter folder such as 'runs/mine'.") from None
    _check(not path.exists() or path.is_dir(),
           f"OUTPUT_DIR={value!r} is a file, not a folder: set OUTPUT_DIR to a folder (it is created if "
           "missing).")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    _check(existing.is_dir(), f"OUTPUT_DIR={value!r} lies under {str(existing)!r}, which is a file: "
                              f"set OUTPUT_DIR to a folder.")
    _check(not on_read_only_mount(existing),
           f"OUTPUT_DIR={value!r} lies on a read-only file system ({str(existing)!r} is mounted read-only, "
           f"so no permission change can help): set OUTPUT_DIR to a folder on a writable disk.")
    _check(os.access(existing, os.W_OK | os.X_OK),
           f"OUTPUT_DIR={value!r} cannot be written: {str(existing)!r} is read-only for you. Make it "
           f"writable (chmod u+w) or set OUTPUT_DIR to a folder you can write.")


def _check_model(model: str, output_dir: str) -> None:
    """MODEL is a known model or a folder holding GPT-2 that the run does not write into."""
    if model in KNOWN_MODELS:
        return
    _check(Path(model).is_dir(), f"MODEL={model!r} is neither a known model nor an existing folder: choose "
                                 f"one of {list(KNOWN_MODELS)} or the path of a folder saved with "
                                 "save_pretrained.")
    check_model_folder(model)
    folder, out = Path(model).resolve(), Path(output_dir).resolve()  # a run writes its files and model/ there
    _check(folder != out and folder not in out.parents,
           f"OUTPUT_DIR={output_dir!r} is the MODEL folder {model!r} (or inside it): the run would write "
           f"into the model it loads. Set OUTPUT_DIR to another folder, e.g. 'runs/mine'.")


def validate(cfg: Settings) -> None:
    """Reject values out of range before anything is read, trained or written."""
    _check_types(asdict(cfg))
    for f in fields(Settings):
        value = getattr(cfg, f.name)
        _check(not (f.type.startswith("float") and value is not None and not math.isfinite(value)),
               f"{f.name}={value!r} is not a finite number: use a value like {_example(f.name)!r}.")
    for name in ("MODEL", "JUDGE_MODEL", "OLLAMA_HOST"):
        _check(getattr(cfg, name).strip() not in ("", "http://"),
               f"{name}={getattr(cfg, name)!r} is empty: set it to a value like {_example(name)!r}, or None "
               "for the default.")
    _check(0 <= cfg.SEED < 2**32, f"SEED={cfg.SEED!r} must lie between 0 and 2**32 - 1 (numpy's range), e.g. "
                                "123.")
    _check_output_dir(cfg.OUTPUT_DIR)
    _check_model(cfg.MODEL, cfg.OUTPUT_DIR)
    for name in ("BATCH_SIZE", "GRAD_ACCUM", "EPOCHS", "EVAL_EVERY", "EVAL_BATCHES", "CHECKPOINT_EVERY",
                 "GEN_BATCH_SIZE", "MAX_NEW_TOKENS"):
        value = getattr(cfg, name)
        _check(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive whole number.")
    for name in ("N_SAMPLES", "MAX_STEPS"):
        value = getattr(cfg, name)
        _check(value is None or (isinstance(value, int) and value > 0),
               f"{name}={value!r} must be a positive whole number, or None for all.")
    _check(isinstance(cfg.MAX_LENGTH, int) and cfg.MAX_LENGTH >= 64,
           f"MAX_LENGTH={cfg.MAX_LENGTH!r} is too short for any prompt: the Alpaca preamble alone takes "
           f"about 40 tokens; use at least 64 (the profiles use 128 to 1024).")
    _check(cfg.LEARNING_RATE > 0, f"LEARNING_RATE={cfg.LEARNING_RATE!r} must be positive (e.g. 5e-5).")
    _check(0 <= cfg.DROPOUT < 1, f"DROPOUT={cfg.DROPOUT!r} must lie in [0, 1) (0 = off).")
    _check(cfg.WEIGHT_DECAY >= 0, f"WEIGHT_DECAY={cfg.WEIGHT_DECAY!r} must be zero or positive.")
    _check(isinstance(cfg.WARMUP_STEPS, int) and cfg.WARMUP_STEPS >= 0,
           f"WARMUP_STEPS={cfg.WARMUP_STEPS!r} must be >= 0.")
    for name in ("LORA_R", "LORA_ALPHA"):
        value = getattr(cfg, name)
        _check(value is None or (isinstance(value, int) and value > 0),
               f"{name}={value!r} must be a positive whole number (e.g. 16), or None (LORA_R: full "
               "fine-tuning).")
    _check(cfg.PRECISION is None or cfg.PRECISION in PRECISIONS,
           f"PRECISION={cfg.PRECISION!r} is unknown: choose one of {list(PRECISIONS)}, or None to pick by "
           "hardware.")
    _check(cfg.JUDGE_BUDGET_S > 0,
           f"JUDGE_BUDGET_S={cfg.JUDGE_BUDGET_S!r} must be a positive number of seconds.")
    _check(cfg.TEMPERATURE >= 0, f"TEMPERATURE={cfg.TEMPERATURE!r} must be >= 0 (0 = greedy).")
    _check(cfg.REPETITION_PENALTY >= 1.0,
           f"REPETITION_PENALTY={cfg.REPETITION_PENALTY!r} must be >= 1.0 (1.0 = off).")
    _check(cfg.NO_REPEAT_NGRAM_SIZE >= 0,
           f"NO_REPEAT_NGRAM_SIZE={cfg.NO_REPEAT_NGRAM_SIZE!r} must be >= 0 (0 = off).")
    _check(isinstance(cfg.N_BEFORE, int) and cfg.N_BEFORE >= 0, f"N_BEFORE={cfg.N_BEFORE!r} must be >= 0.")
    for name in ("VAL_FRACTION", "TEST_FRACTION"):
        value = getattr(cfg, name)
        _check(0 < value < 1, f"{name}={value!r} must lie between 0 and 1 so that the split is not empty.")
    _check(cfg.VAL_FRACTION + cfg.TEST_FRACTION < 1,
           f"VAL_FRACTION + TEST_FRACTION = {cfg.VAL_FRACTION + cfg.TEST_FRACTION} leaves no training data: "
           f"keep their sum below 1 (default 0.10 + 0.05).")


def run_signature(cfg: Settings) -> dict:
    """The settings that define the run (RUN_DEFINING), as run.json records them."""
    return {name: getattr(cfg, name) for name in RUN_DEFINING}


def claim_output_dir(cfg: Settings, data_file=None, model_source=None, data: dict | None = None) -> Path:
    """Make OUTPUT_DIR this run's (see run_folder.claim): the last step before the run writes its first file
    there, after the data is read and the model loaded. `data`, what was read (medqa.data.describe), goes
    into metrics.json at once, so that every record of the run names its data."""
    out = run_folder.claim(cfg.OUTPUT_DIR, run_signature(cfg), cfg.OVERWRITE, data_file, model_source)
    if data is not None:
        update_json(out / "metrics.json", data=data)
    return out

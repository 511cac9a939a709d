"""The notebook's settings: from its parameters cell (or papermill's; `None` there means "not set here"), else
the variable `MEDQA_<NAME>`, else the profile's default; all checked before anything is written."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from medqa import run_folder, setting_names
from medqa.errors import MedQAError, require
from medqa.model_folder import KNOWN_MODELS, TINY_MODEL, check_model_folder
from medqa.ollama_api import DEFAULT_HOST, check_ollama_host
from medqa.store import on_read_only_mount, update_json, url_scheme

PRECISIONS = ("bf16", "fp16", "fp32")

PROFILES = {
    # No network: a tiny random GPT-2 and a few hundred examples, to check the whole notebook runs.
    "smoke": dict(MODEL=TINY_MODEL, N_SAMPLES=200, MAX_LENGTH=256, EPOCHS=1, LEARNING_RATE=5e-3,
                  WARMUP_STEPS=2, EVAL_EVERY=5, EVAL_BATCHES=4, MAX_NEW_TOKENS=32, N_BEFORE=3),
    # No network: a small GPT-2 shape trained from random weights on a CPU, to show learning. MASK_PROMPT: a
    # model that starts from nothing spends its few steps on the answers. Deep, as the output layer
    # (50257 x 128) costs most of a step; fp32, so that the stored losses reproduce on CPUs without bf16.
    "demo": dict(MODEL="random-gpt2-mini-deep", N_SAMPLES=6000, MAX_LENGTH=128, EPOCHS=1, LEARNING_RATE=2e-3,
                 WARMUP_STEPS=30, EVAL_EVERY=40, EVAL_BATCHES=4, MAX_NEW_TOKENS=64, N_BEFORE=3,
                 MASK_PROMPT=True, PRECISION="fp32"),
    # A laptop with a network: GPT-2 124M on about 1,000 examples.
    "cpu": dict(MODEL="gpt2", N_SAMPLES=1000, MAX_LENGTH=512, EPOCHS=2, LEARNING_RATE=5e-5, WARMUP_STEPS=10,
                EVAL_EVERY=20, EVAL_BATCHES=10, MAX_NEW_TOKENS=200, N_BEFORE=3),
    # A GPU: GPT-2 355M on all of MedQuAD.
    "full": dict(MODEL="gpt2-medium", N_SAMPLES=None, MAX_LENGTH=1024, EPOCHS=2, LEARNING_RATE=5e-5,
                 WARMUP_STEPS=100, EVAL_EVERY=100, EVAL_BATCHES=20, MAX_NEW_TOKENS=256, N_BEFORE=3),
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of a run; the defaults are those the profiles share (COMMON)."""
    PROFILE: str
    MODEL: str
    DATA_PATH: str | None = None
    N_SAMPLES: int | None
    MAX_LENGTH: int
    BATCH_SIZE: int = 8
    GRAD_ACCUM: int = 1
    EPOCHS: int
    LEARNING_RATE: float
    WEIGHT_DECAY: float = 0.1
    WARMUP_STEPS: int
    DROPOUT: float = 0.0
    LORA_R: int | None = None
    LORA_ALPHA: int | None = None
    PRECISION: str | None = None
    MAX_STEPS: int | None = None
    EVAL_EVERY: int
    EVAL_BATCHES: int
    CHECKPOINT_EVERY: int = 200
    MASK_PROMPT: bool = False
    VAL_FRACTION: float = 0.10
    TEST_FRACTION: float = 0.05
    SEED: int = 123
    MAX_NEW_TOKENS: int
    GEN_BATCH_SIZE: int = 32
    TEMPERATURE: float = 0.0
    REPETITION_PENALTY: float = 1.0
    NO_REPEAT_NGRAM_SIZE: int = 3
    N_BEFORE: int
    BASELINE_EVAL: bool = True
    JUDGE_MODEL: str = "llama3"
    JUDGE_BUDGET_S: float = 3600.0
    OLLAMA_HOST: str = DEFAULT_HOST
    OUTPUT_DIR: str = None  # resolve() makes it runs/<PROFILE>
    OVERWRITE: bool = False

    def show(self) -> None:
        """Print every setting, one a line."""
        width = max(map(len, asdict(self)))
        for name, value in asdict(self).items():
            print(f"{name:<{width}} = {value!r}")


# The defaults every profile shares; a profile's own entries override these.
COMMON = {f.name: f.default for f in fields(Settings) if f.default is not MISSING}

# Settings that change what training produces: a resumed run must agree on all of them.
RUN_DEFINING = ("MODEL", "DATA_PATH", "N_SAMPLES", "MAX_LENGTH", "BATCH_SIZE", "GRAD_ACCUM", "EPOCHS",
                "LEARNING_RATE", "WEIGHT_DECAY", "WARMUP_STEPS", "DROPOUT", "LORA_R", "LORA_ALPHA",
                "EVAL_EVERY", "EVAL_BATCHES", "MASK_PROMPT", "VAL_FRACTION", "TEST_FRACTION", "SEED")

_TYPES = {f.name: f.type for f in fields(Settings)}  # "int | None", ...
_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "True or False", "str": "text"}
# Values for messages, for the settings no profile sets to anything but None.
EXAMPLES = {"LORA_R": 16, "LORA_ALPHA": 32, "MAX_STEPS": 100}


def _example(name: str):
    """A valid value of the setting, for messages."""
    given = (p[name] for p in (COMMON, *PROFILES.values()) if p.get(name) is not None)
    return next(given, EXAMPLES.get(name))


def _parse_env(name: str, text: str):
    """The text of `MEDQA_<name>` as the setting's type."""
    kind, text = _TYPES[name], text.strip()
    base = kind.split(" ")[0]
    if "None" in kind and text.lower() in ("", "none", "null"):
        return None
    if base == "bool":
        if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text.lower() in ("1", "true", "yes", "on")
        raise MedQAError(f"MEDQA_{name}={text!r} is not a yes/no value: set it to 1, true or yes for True, "
                         f"or 0, false or no for False.")
    try:
        return {"int": int, "float": float, "str": str}[base](text)
    except ValueError:
        raise MedQAError(f"MEDQA_{name}={text!r} is not {_TYPE_WORDS[base]}: set it to a value like "
                         f"{_example(name)!r}.") from None


def default_profile() -> str:
    """The profile for PROFILE=None on this machine (profile_choice says why)."""
    return profile_choice()[0]


def profile_choice() -> tuple[str, str]:
    """The profile for this machine (medqa.hardware.choose_profile) and why, in words; `full` on a CUDA GPU
    whose free memory cannot be read, as train() plans micro-batches so that it fits."""
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
    """The settings the parameters cell gave, from the notebook's `globals()`. A name there that looks like a
    setting but is none (papermill's `-p LEARNIN_RATE 1e-4` only warns) is refused (refuse_strays)."""
    setting_names.refuse_strays(namespace, list(_TYPES))
    return {k: v for k, v in namespace.items() if k in _TYPES}


def resolve(params: dict, env: dict | None = None, log=print) -> Settings:
    """Combine the parameters cell (`params`, upper-case names), `MEDQA_*` variables and the profile."""
    env = os.environ if env is None else env
    setting_names.refuse_unknown(params, env, list(_TYPES))

    def given(name, default=None):
        if params.get(name) is not None:
            return params[name]
        if f"MEDQA_{name}" in env:
            return _parse_env(name, env[f"MEDQA_{name}"])
        return default

    profile = given("PROFILE")
    if profile is None:
        profile, why = profile_choice()
        log(f"PROFILE not set: {profile!r} for this machine ({why}).")
    if not isinstance(profile, str) or profile not in PROFILES:
        close = setting_names.closest(profile, PROFILES)
        raise MedQAError(f"PROFILE={profile!r} is unknown{f' (did you mean {close!r}?)' if close else ''}: "
                         f"choose one of {sorted(PROFILES)}.")
    values = {**COMMON, **PROFILES[profile], "PROFILE": profile}
    if env.get("OLLAMA_HOST"):  # Ollama's own variable, below MEDQA_OLLAMA_HOST
        values["OLLAMA_HOST"] = env["OLLAMA_HOST"]
    values = {name: given(name, values[name]) for name in _TYPES}
    if values["OUTPUT_DIR"] is None:
        values["OUTPUT_DIR"] = f"runs/{profile}"
    _check_types(values)
    for name in ("MODEL", "OUTPUT_DIR", "DATA_PATH"):  # "~/runs" is in the home folder, not in a folder "~"
        if values[name] is not None:
            values[name] = os.path.expanduser(values[name])
    values["OLLAMA_HOST"] = check_ollama_host(values["OLLAMA_HOST"])  # now, not in the judge after training
    settings = Settings(**values)
    validate(settings)
    return settings


def _check_types(values: dict) -> None:
    """Every setting has its declared type: papermill's `-p OVERWRITE maybe` gives a string, `-p BATCH_SIZE
    8.0` a float, and Python counts True as the whole number 1."""
    for name, kind in _TYPES.items():
        value, base, nullable = values[name], kind.split(" | ")[0], "None" in kind
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        ok = {"int": number and isinstance(value, numbers.Integral), "float": number,
              "bool": isinstance(value, bool), "str": isinstance(value, str)}[base]
        if ok or (value is None and nullable):
            continue
        or_none = " or None" if nullable else ""
        if base == "bool":
            raise MedQAError(f"{name}={value!r} must be True or False (papermill: -p {name} True; in the "
                             f"environment: MEDQA_{name}=1, true or yes, or 0, false or no).")
        if base == "int" and number and math.isfinite(value) and value == int(value):
            raise MedQAError(f"{name}={value!r} must be a whole number: write {int(value)} without the "
                             f"decimal point.")
        if isinstance(value, str):  # a number given as text ("8" in quotes, or papermill's -r)
            try:
                meant = _parse_env(name, value)
            except MedQAError:
                meant = None
            meant = _example(name) if meant is None else meant
            raise MedQAError(f"{name}={value!r} is text (str), but {name} must be {_TYPE_WORDS[base]}"
                             f"{or_none}: write it without quotes, e.g. {name} = {meant!r} in the parameters "
                             f"cell (papermill: -p {name} {meant!r}).")
        raise MedQAError(f"{name}={value!r} ({type(value).__name__}) must be {_TYPE_WORDS[base]}{or_none}, "
                         f"e.g. {_example(name)!r}.")


def _check_output_dir(value: str) -> None:
    """OUTPUT_DIR can become the run's folder: nothing is written here, so a failed run leaves no trace."""
    require(value.strip() != "",
            "OUTPUT_DIR='' names no folder (the run would write into the current folder): set it to a folder "
            "such as 'runs/mine', or None for runs/<PROFILE>.")
    require("\x00" not in value, f"OUTPUT_DIR={value!r} holds a NUL character, which no folder name can: set "
                                 f"it to a folder such as 'runs/mine'.")
    require(url_scheme(value) is None,
            f"OUTPUT_DIR={value!r} is a URL: a run writes into a folder on this machine. Set OUTPUT_DIR to "
            f"a local folder (on Colab a mounted Drive folder such as '/content/drive/MyDrive/runs' works), "
            f"and copy the folder to that storage when the run has ended.")
    path = Path(value)
    try:
        path.exists()
    except OSError as err:
        raise MedQAError(f"OUTPUT_DIR={value[:80]!r}... cannot be a folder ({err.strerror}): set it to a "
                         f"shorter folder such as 'runs/mine'.") from None
    require(not path.exists() or path.is_dir(),
            f"OUTPUT_DIR={value!r} is a file, not a folder: set OUTPUT_DIR to a folder (it is created if "
            f"missing).")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    require(existing.is_dir(), f"OUTPUT_DIR={value!r} lies under {str(existing)!r}, which is a file: set "
                               f"OUTPUT_DIR to a folder.")
    require(not on_read_only_mount(existing),
            f"OUTPUT_DIR={value!r} lies on a read-only file system ({str(existing)!r} is mounted read-only, "
            f"so no permission change can help): set OUTPUT_DIR to a folder on a writable disk.")
    require(os.access(existing, os.W_OK | os.X_OK),
            f"OUTPUT_DIR={value!r} cannot be written: {str(existing)!r} is read-only for you. Make it "
            f"writable (chmod u+w) or set OUTPUT_DIR to a folder you can write.")


def _check_model(model: str, output_dir: str) -> None:
    """MODEL is a known model or a folder holding GPT-2 that the run does not write into."""
    if model in KNOWN_MODELS:
        return
    require(Path(model).is_dir(), f"MODEL={model!r} is neither a known model nor an existing folder: choose "
                                  f"one of {list(KNOWN_MODELS)} or the path of a folder saved with "
                                  f"save_pretrained.")
    check_model_folder(model)
    folder, out = Path(model).resolve(), Path(output_dir).resolve()  # a run writes its files and model/ there
    require(folder != out and folder not in out.parents,
            f"OUTPUT_DIR={output_dir!r} is the MODEL folder {model!r} (or inside it): the run would write "
            f"into the model it loads. Set OUTPUT_DIR to another folder, e.g. 'runs/mine'.")


# Ranges, checked in this order after the types, SEED and the folders: (names, rule, message).
_RANGES = (
    (("BATCH_SIZE", "GRAD_ACCUM", "EPOCHS", "EVAL_EVERY", "EVAL_BATCHES", "CHECKPOINT_EVERY",
      "GEN_BATCH_SIZE", "MAX_NEW_TOKENS"), lambda v: isinstance(v, int) and v > 0,
     "{name}={value!r} must be a positive whole number."),
    (("N_SAMPLES", "MAX_STEPS"), lambda v: v is None or (isinstance(v, int) and v > 0),
     "{name}={value!r} must be a positive whole number, or None for all."),
    (("MAX_LENGTH",), lambda v: isinstance(v, int) and v >= 64,
     "{name}={value!r} is too short for any prompt: the Alpaca preamble alone takes about 40 tokens; use at "
     "least 64 (the profiles use 128 to 1024)."),
    (("LEARNING_RATE",), lambda v: v > 0, "{name}={value!r} must be positive (e.g. 5e-5)."),
    (("DROPOUT",), lambda v: 0 <= v < 1, "{name}={value!r} must lie in [0, 1) (0 = off)."),
    (("WEIGHT_DECAY",), lambda v: v >= 0, "{name}={value!r} must be zero or positive."),
    (("WARMUP_STEPS",), lambda v: isinstance(v, int) and v >= 0, "{name}={value!r} must be >= 0."),
    (("LORA_R", "LORA_ALPHA"), lambda v: v is None or (isinstance(v, int) and v > 0),
     "{name}={value!r} must be a positive whole number (e.g. 16), or None (LORA_R: full fine-tuning)."),
    (("PRECISION",), lambda v: v is None or v in PRECISIONS,
     "{name}={value!r} is unknown: choose one of " + f"{list(PRECISIONS)}, or None to pick by hardware."),
    (("JUDGE_BUDGET_S",), lambda v: v > 0, "{name}={value!r} must be a positive number of seconds."),
    (("TEMPERATURE",), lambda v: v >= 0, "{name}={value!r} must be >= 0 (0 = greedy)."),
    (("REPETITION_PENALTY",), lambda v: v >= 1.0, "{name}={value!r} must be >= 1.0 (1.0 = off)."),
    (("NO_REPEAT_NGRAM_SIZE",), lambda v: v >= 0, "{name}={value!r} must be >= 0 (0 = off)."),
    (("N_BEFORE",), lambda v: isinstance(v, int) and v >= 0, "{name}={value!r} must be >= 0."),
    (("VAL_FRACTION", "TEST_FRACTION"), lambda v: 0 < v < 1,
     "{name}={value!r} must lie between 0 and 1 so that the split is not empty."),
)


def validate(cfg: Settings) -> None:
    """Reject values of the wrong type or out of range before anything is read, trained or written."""
    _check_types(asdict(cfg))
    for name in [name for name, kind in _TYPES.items() if kind == "float"]:
        require(math.isfinite(getattr(cfg, name)),
                f"{name}={getattr(cfg, name)!r} is not a finite number: use a value like {_example(name)!r}.")
    for name in ("MODEL", "JUDGE_MODEL", "OLLAMA_HOST"):
        require(getattr(cfg, name).strip() not in ("", "http://"), f"{name}={getattr(cfg, name)!r} is empty: "
                f"set it to a value like {_example(name)!r}, or None for the default.")
    require(0 <= cfg.SEED < 2**32,
            f"SEED={cfg.SEED!r} must lie between 0 and 2**32 - 1 (numpy's range), e.g. 123.")
    _check_output_dir(cfg.OUTPUT_DIR)
    _check_model(cfg.MODEL, cfg.OUTPUT_DIR)
    for names, ok, message in _RANGES:
        for name in names:
            require(ok(getattr(cfg, name)), message.format(name=name, value=getattr(cfg, name)))
    require(cfg.VAL_FRACTION + cfg.TEST_FRACTION < 1,
            f"VAL_FRACTION + TEST_FRACTION = {cfg.VAL_FRACTION + cfg.TEST_FRACTION} leaves no training data: "
            f"keep their sum below 1 (default 0.10 + 0.05).")


def run_signature(cfg: Settings) -> dict:
    """The settings that define the run (RUN_DEFINING), as run.json records them."""
    return {name: getattr(cfg, name) for name in RUN_DEFINING}


def claim_output_dir(cfg: Settings, data_file=None, model_source=None, data: dict | None = None) -> Path:
    """Make OUTPUT_DIR this run's (run_folder.claim), once the data is read and the model loaded. `data`
    (medqa.data.describe) goes into metrics.json at once, so that every record of the run names its data."""
    out = run_folder.claim(cfg.OUTPUT_DIR, run_signature(cfg), cfg.OVERWRITE, data_file, model_source)
    if data is not None:
        update_json(out / "metrics.json", data=data)
    return out

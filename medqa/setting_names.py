"""Names a run would not use, in the notebook's parameters cell, papermill's injected cell or the environment:
each refused with the setting it resembles (`LEARNIN_RATE`: did you mean `LEARNING_RATE`?)."""

from __future__ import annotations

import ast
import contextlib
import difflib
import numbers

from medqa.errors import MedQAError

# What `papermill --inject-paths` (or --inject-input-path / --inject-output-path) adds to its cell.
PAPERMILL_NAMES = {"PAPERMILL_INPUT_PATH", "PAPERMILL_OUTPUT_PATH"}


def refuse_strays(namespace: dict, names: list[str]) -> None:
    """Refuse the names in the notebook's `namespace` (its globals) that look like settings but are none of
    `names`: any name in papermill's injected cell, and looks_like_setting's."""
    injected = injected_names(namespace.get("In", [])) - PAPERMILL_NAMES
    strays = sorted(k for k, v in namespace.items()
                    if k not in names and (k in injected or looks_like_setting(k, v, names)))
    if strays:
        raise MedQAError(f"Unknown setting(s) {strays}, which this run would not use{hints(strays, names)}: "
                         f"the settings are {names}. A name stays defined in the kernel after it is "
                         f"corrected in the cell: run `del {', '.join(strays)}` (or restart the kernel) once "
                         f"the cell is right.")


def injected_names(cells) -> set[str]:
    """The names papermill's injected-parameters cell assigns, from the kernel's input history (`In`)."""
    found = set()
    for source in cells if isinstance(cells, list) else []:
        if isinstance(source, str) and source.startswith("# Parameters\n"):
            with contextlib.suppress(SyntaxError):
                found |= {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
                          for t in node.targets if isinstance(t, ast.Name)}
    return found


def looks_like_setting(name: str, value, names: list[str]) -> bool:
    """Whether a name in the notebook's namespace is a mistyped setting: a plain value under a setting's
    name in other capitals, or an upper-case name close to one."""
    if name.startswith("_") or not (value is None or isinstance(value, (str, bool, numbers.Number))):
        return False
    return name.upper() in names or (name.isupper() and bool(difflib.get_close_matches(name, names, 1, 0.8)))


def closest(name, choices) -> str | None:
    """The one of `choices` that `name` most resembles (capitals ignored), if any is close."""
    if not isinstance(name, str):
        return None
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.6)
    return lower[close[0]] if close else None


def hints(given: list[str], names: list[str], prefix: str = "") -> str:
    """' (LEARNIN_RATE: did you mean LEARNING_RATE?)' for each given name close to a setting's name."""
    pairs = [(g, closest(g[len(prefix):], names)) for g in given]
    return "".join(f" ({g}: did you mean {prefix}{best}?)" for g, best in pairs if best)


def refuse_unknown(params: dict, env, names: list[str]) -> None:
    """Names the run would not use, in the parameters or the environment, with the setting each resembles."""
    unknown = sorted(k for k in params if k not in names)
    if unknown:
        raise MedQAError(f"Unknown setting(s) {unknown}{hints(unknown, names)}: the settings are {names}.")
    unknown_env = sorted(k for k in env if k.upper().startswith("MEDQA_") and
                         (not k.startswith("MEDQA_") or k[6:] not in names))
    if unknown_env:
        raise MedQAError(f"Unknown environment variable(s) {unknown_env}"
                         f"{hints(unknown_env, names, 'MEDQA_')}: use MEDQA_<NAME> with NAME one of {names} "
                         f"(in capitals, as written here).")

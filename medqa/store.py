"""Writing results so that an interrupted run leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

# What a run writes into OUTPUT_DIR (run.json, which names the run, is rewritten by claim_output_dir).
RUN_FILES = ("checkpoint.pt", "metrics.json", "loss.png", "scores.png", "test_responses.json",
             "base_responses.json", "model", "tiny-gpt2", "splits")


def write_json_atomic(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def update_json(path, **parts) -> dict:
    """Merge `parts` into the JSON object at `path` (created if missing)."""
    path = Path(path)
    obj = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    obj.update(parts)
    write_json_atomic(path, obj)
    return obj


def save_torch_atomic(obj, path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_model_atomic(model, folder) -> Path:
    """`save_pretrained` into a fresh folder, then swap it in for the old one."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def discard_run(out_dir) -> None:
    """Remove what an earlier run wrote (only on OVERWRITE=True)."""
    for name in RUN_FILES:
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

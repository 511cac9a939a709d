"""What a run writes into OUTPUT_DIR, against the free disk: checked before training, so that a small disk
stops the run before the first checkpoint, not at it."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from medqa.errors import MedQAError

GiB, MiB = 1024 ** 3, 1024 ** 2
SMALL_FILES = 64 * 1024 ** 2  # answers, figures, metrics, splits, the model card: a few MB, and room
ADAM_MOMENTS = 2  # AdamW keeps two fp32 tensors per trained parameter


def _stored_bytes(tensors) -> int:
    """Bytes torch.save and safetensors write: a storage shared by two names (GPT-2's tied embedding and LM
    head) is written once."""
    storages = {}
    for t in tensors:
        storages.setdefault((t.untyped_storage().data_ptr(), t.device.type), t.untyped_storage().nbytes())
    return sum(storages.values())


def checkpoint_bytes(model) -> int:
    """The training checkpoint: the state_dict and AdamW's moments in the trained parameters' precision."""
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return _stored_bytes(model.state_dict().values()) + ADAM_MOMENTS * trained


def model_folder_bytes(model) -> int:
    """The saved model folder: the weights with any LoRA adapters merged into them."""
    return _stored_bytes(t for name, t in model.state_dict().items() if "lora_" not in name)


def size(n_bytes: int) -> str:
    """A size in words: GiB to one decimal, or MiB rounded up under 0.1 GiB (never a false 0.0)."""
    if n_bytes >= GiB / 10:
        return f"{n_bytes / GiB:.1f} GiB"
    return f"{math.ceil(n_bytes / MiB)} MiB"


@dataclass(frozen=True)
class DiskEstimate:
    folder: str
    checkpoint_bytes: int
    model_bytes: int
    free_bytes: int       # free on the disk, plus what the run's own old checkpoint and model folder take
    lora_checkpoint_bytes: int
    lora: bool  # the model trains LoRA adapters already

    @property
    def needed_bytes(self) -> int:
        """At its fullest: a new checkpoint written beside the old one, the model folder, the small files."""
        return 2 * self.checkpoint_bytes + self.model_bytes + SMALL_FILES

    def describe(self) -> str:
        """The line plan_run adds to the memory plan."""
        return (f"disk: the run writes up to {size(self.needed_bytes)} into {self.folder} (checkpoint "
                f"{size(self.checkpoint_bytes)}, twice while the new one is written beside the old; "
                f"model folder {size(self.model_bytes)}); {size(self.free_bytes)} free")


def estimate(model, out_dir) -> DiskEstimate:
    """What the run will write into `out_dir` (which need not exist yet) and what the disk there has free."""
    out = Path(out_dir).absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    owned = (out / "checkpoint.pt", out / "model")  # the run's own, if any, replaced as it writes
    replaced = sum(p.stat().st_size for q in owned for p in (q, *q.rglob("*")) if p.is_file())
    free = shutil.disk_usage(existing).free + replaced
    weights = _stored_bytes(model.state_dict().values())
    lora = weights + ADAM_MOMENTS * 4 * sum(p.numel() for p in model.parameters()) // 100  # adapters: ~1%
    adapters = any("lora_" in name for name in model.state_dict())
    return DiskEstimate(str(out_dir), checkpoint_bytes(model), model_folder_bytes(model), free, lora,
                        adapters)


def check(est: DiskEstimate) -> None:
    """Stop with the figures and the fixes when the disk is short."""
    if est.needed_bytes <= est.free_bytes:
        return
    fixes = [f"set OUTPUT_DIR to a folder on a disk with at least {size(est.needed_bytes)} free",
             "free some space on this one"]
    if not est.lora:
        smaller = 2 * est.lora_checkpoint_bytes + est.model_bytes + SMALL_FILES
        fixes.append(f"set LORA_R (e.g. 16): AdamW's moments then cover the adapters only, about "
                     f"{size(smaller)} in all")
    short = size(est.needed_bytes - est.free_bytes)
    raise MedQAError(f"Not enough disk for this run: {est.describe()}, {short} short. Nothing was "
                     f"written; {', or '.join(fixes)}.")

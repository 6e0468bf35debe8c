"""Training checkpoints: which one a run resumes from, and what makes one damaged.

transformers' `Trainer` (5.x, `Trainer._save_checkpoint`) writes `checkpoint-N/` in place, file by file: the
weights, then `optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `trainer_state.json` last, then deletes the
checkpoints beyond `save_total_limit`. A run killed while saving therefore leaves a `checkpoint-N/` that is
partly written, and a copy cut short or a full disk leaves one that is truncated. Such a folder must never be
resumed: `checkpoint_problem` reads every file of a checkpoint (safetensors headers and sizes, the CRC of every
member of torch's zip files, never unpickling them, and `trainer_state.json`) and names what is wrong.

`resolve_checkpoint` applies it when `--resume_from_checkpoint` is given:

- bare (or `last`): the newest checkpoint whose files all verify. Newer ones that do not are set aside, renamed
  `damaged-checkpoint-N` (kept for inspection, ignored by the Trainer), each with a log line saying why: the run
  falls back to the previous complete checkpoint. With no complete checkpoint at all the run starts from the
  beginning, so that the same command works whenever a run is killed (a scheduler that restarts a job);
- a path: that checkpoint, which must verify, else an error naming it and what is wrong.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

__all__ = ["DAMAGED_PREFIX", "checkpoint_problem", "complete_checkpoints", "resolve_checkpoint", "set_aside"]

DAMAGED_PREFIX = "damaged-"
# What every checkpoint of a run that saves its optimizer holds (a model-only checkpoint cannot be resumed)
REQUIRED = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")
_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problem(folder: str | Path, required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with the checkpoint `folder` (a missing, empty, truncated or unreadable file), or None when
    every file verifies; `required` names files a run adds to its checkpoints (the weight average). Reads the
    files through; unpickles nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    missing = [name for name in (*REQUIRED, *required) if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)} (a save that did not finish)"
    for path in sorted(folder.iterdir()):
        if path.is_file() and (problem := _file_problem(path)):
            return f"{path.name}: {problem}"
    return None


def _file_problem(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return "empty"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 -- safe_open is no dict
                    f.get_slice(key)
        except (SafetensorError, OSError) as err:
            return f"unreadable safetensors ({err})"
    elif path.suffix in (".pt", ".pth", ".bin"):  # torch.save's zip format: check every member's CRC
        try:
            with zipfile.ZipFile(path) as archive:
                if (bad := archive.testzip()) is not None:
                    return f"corrupt member {bad}"
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"not a complete torch file ({err})"
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            return f"not valid JSON ({err})"
    return None


def _checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the `checkpoint-N` folders, newest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """The checkpoints of `checkpoint_dir` whose files all verify, newest first."""
    return [path for _, path in _checkpoints(Path(checkpoint_dir)) if checkpoint_problem(path) is None]


def resolve_checkpoint(
    checkpoint_dir: str | Path, requested: str | None, last: str, required: tuple[str, ...] = ()
) -> tuple[str | None, list]:
    """The checkpoint to resume from (None: the run starts from the beginning) for `--resume_from_checkpoint
    requested` (`last`: the bare flag), and the damaged checkpoints newer than it as (folder, problem) pairs, for
    `set_aside` once the run holds its folder. Writes nothing. Raises ValueError for a requested path that is not
    a complete checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    if requested is None:
        return None, []
    if requested != last:
        problem = checkpoint_problem(requested, required)
        if problem == "not a folder":
            raise ValueError(f"--resume_from_checkpoint: {requested} is not a checkpoint folder")
        if problem is not None:
            raise ValueError(
                f"--resume_from_checkpoint: {requested} is damaged: {problem}. Resume from an earlier checkpoint, "
                f"or give the bare flag to resume from the newest complete one in {checkpoint_dir}"
            )
        return str(requested), []
    damaged = []
    for _, path in _checkpoints(checkpoint_dir):
        problem = checkpoint_problem(path, required)
        if problem is None:
            return str(path), damaged
        damaged.append((path, problem))
    return None, damaged


def set_aside(damaged: list[tuple[Path, str]]) -> None:
    """Rename each damaged checkpoint folder `checkpoint-N` to `damaged-checkpoint-N` (the Trainer neither resumes
    nor rotates those), with a warning saying why."""
    for path, problem in damaged:
        target = path.with_name(DAMAGED_PREFIX + path.name)
        suffix = 1
        while target.exists():
            target = path.with_name(f"{DAMAGED_PREFIX}{path.name}.{suffix}")
            suffix += 1
        path.rename(target)
        logger.warning(f"{path} is damaged ({problem}): set aside as {target.name}; resuming from an earlier one")

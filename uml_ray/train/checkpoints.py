"""A run's checkpoint folder: the loop state and the best-val products written, read back, and the
kept checkpoints beside it that a resume falls back on.

``state.pt`` holds what a resume needs besides the best-val weights (model, optimizer, scheduler,
step, stream positions, RNG state, the book); ``best.pt`` the best-val products (weights, config,
dataset, val accuracy, step), the one copy of the best weights: a resume reads both, the driver
records ``best.pt`` in MLflow.
"""

from __future__ import annotations

import os

import torch

from uml_ray.errors import UserError

STATE_FILE = "state.pt"
BEST_FILE = "best.pt"
# the restored loop state's key for the best-val products (best.pt), which alone hold the best weights
BEST = "best"


def write_checkpoint(folder: str, state: dict, best: dict) -> None:
    """The loop state and the best-val products (the run's product: resume reads both) in one folder."""
    torch.save(state, os.path.join(folder, STATE_FILE))
    torch.save(best, os.path.join(folder, BEST_FILE))


class CheckpointError(UserError):
    """A checkpoint's loop state cannot be read (truncated, corrupt or missing): the message names
    the file."""


def read_state(folder: str, shown_as: str = "") -> dict:
    """Loop state saved by ``write_checkpoint``, its products under ``BEST``; an unreadable file is a
    ``CheckpointError`` naming it (``shown_as``: the folder's real place, when ``folder`` is a
    downloaded copy), never torch's own error."""
    state = _load(folder, STATE_FILE, shown_as)
    # a checkpoint from before the products held the only copy of the best weights needs no best.pt
    return state if "best_weights" in state else {**state, BEST: _load(folder, BEST_FILE, shown_as)}


def _load(folder: str, name: str, shown_as: str) -> dict:
    try:
        return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises RuntimeError, EOFError, UnpicklingError, OSError...
        reason = " ".join(str(exc).split()).split(". ")[0][:200]
        path = f"{shown_as}/{name}" if shown_as else os.path.join(folder, name)
        raise CheckpointError(
            f"checkpoint file {path} is unreadable ({type(exc).__name__}: {reason})"
        ) from None


def kept_checkpoints(checkpoint) -> list:
    """The other checkpoints kept beside a Ray ``checkpoint`` (same folder; Tune and Ray Train name them
    in time order), newest first."""
    from pyarrow import fs as pafs

    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    found = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    names = sorted(
        (
            info.base_name
            for info in found
            if info.type == pafs.FileType.Directory
            and info.base_name.startswith("checkpoint_")
            and info.base_name != name
        ),
        reverse=True,
    )
    return [type(checkpoint)(f"{parent}/{other}", filesystem=checkpoint.filesystem) for other in names]


def checkpoint_step(checkpoint) -> int | None:
    """The training step a Tune ``checkpoint`` was reported at, from the trial's result.json beside it
    (the last result naming its folder); None when that is not found (a Ray Train run's checkpoint)."""
    import json

    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    try:
        with checkpoint.filesystem.open_input_stream(f"{parent}/result.json") as handle:
            lines = handle.read().decode().splitlines()
    except OSError:
        return None
    step = None
    for line in lines:
        try:
            result = json.loads(line)
        except ValueError:  # a line cut short by a killed writer
            continue
        if result.get("checkpoint_dir_name") == name and "step" in result:
            step = int(result["step"])
    return step


def restore_state(checkpoint, notices: list[str] | None = None) -> dict:
    """The loop state of a Ray ``checkpoint``. When its file is unreadable (a node died while writing
    it, a disk filled up), the newest other checkpoint kept beside it that reads serves instead —
    Tune keeps two per trial — with one line naming both steps, appended to ``notices``; when none
    reads, a ``CheckpointError`` naming the file."""
    problems = []
    for candidate in [checkpoint, *kept_checkpoints(checkpoint)]:
        try:
            with candidate.as_directory() as folder:
                state = read_state(folder, shown_as=candidate.path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            lost = checkpoint_step(checkpoint)
            at = f"at step {lost}" if lost is not None else f"of {checkpoint.path}"
            step = checkpoint_step(candidate)
            if step is None:  # a single config's state keeps its step in its progress, a fused one's on top
                step = state["step"] if "step" in state else state.get("progress", {}).get("step")
            line = f"{STATE_FILE} {at} unreadable: resumed from step {step} ({candidate.path})"
            (notices if notices is not None else []).append(line)
        return state
    others = f"; so are the {len(problems) - 1} other(s) kept beside it" if len(problems) > 1 else ""
    raise CheckpointError(
        f"{problems[0]}{others}; the run cannot resume from it: start it again under a new --name"
    )

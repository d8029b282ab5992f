"""Which Trainer checkpoints are whole.

A process killed while a checkpoint is written (SIGKILL on pre-emption) leaves a `checkpoint-N` folder that upstream's
`resume_from_checkpoint=True` would take as the latest: a model without optimizer state, a missing trainer state
(the run silently restarts at step 0 with step N's weights) or missing heads. The plugin's Trainer announces each
save before it starts (`SAVING_PREFIX + "checkpoint-N"`, a file beside the folder) and, once every file of it (all
ranks) is written, marks the folder complete (`COMPLETE_FILE` inside it) and withdraws the announcement. A folder
announced but never marked is cut: never resumed from, and removed when that step is saved again. A folder with
neither file was written without the plugin (upstream alone, or an older version) and is upstream's to judge, as
before. Older checkpoints are rotated away only after the new one is marked.

Safe against a killed process, not against power loss: nothing is fsynced (a killed process's writes are in the page
cache and reach the disk; a lost machine's may not).
"""
from __future__ import annotations

import os
import re
import shutil

COMPLETE_FILE = "vlm_preserve_complete"
SAVING_PREFIX = "vlm_preserve_saving-"  # not "checkpoint-*": upstream LLaVA's train() resumes when that glob matches
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR folders
_STAGING = re.compile(r"^tmp-checkpoint-(\d+)$")  # transformers < 4.37 writes here first and renames when done


def _saving(path: str) -> str:
    return os.path.join(os.path.dirname(path), SAVING_PREFIX + os.path.basename(path))


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_FILE))


def is_cut(path: str) -> bool:
    """Announced by the plugin's save and never marked complete."""
    return os.path.isfile(_saving(path)) and not is_complete(path)


def begin(path: str) -> None:
    """Before checkpoint `path` is written: a cut write left there (or upstream's staging folder for it) goes, so none
    of its stale files can mix with the new ones, and the save is announced."""
    if os.path.isdir(path) and is_cut(path):
        shutil.rmtree(path)
    staging = os.path.join(os.path.dirname(path), "tmp-" + os.path.basename(path))
    if os.path.isdir(staging):
        shutil.rmtree(staging)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _write(_saving(path), "this checkpoint is being written; it is whole once it holds " + COMPLETE_FILE + "\n")


def mark_complete(path: str) -> None:
    _write(os.path.join(path, COMPLETE_FILE), "every file of this checkpoint was written\n")
    if os.path.exists(_saving(path)):
        os.remove(_saving(path))


def checkpoints(run_dir: str) -> list[str]:
    """The checkpoint folders in `run_dir`, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(run_dir)
             if (m := _CHECKPOINT.match(n)) and os.path.isdir(os.path.join(run_dir, n))]
    return [os.path.join(run_dir, n) for _, n in sorted(found)]


def latest_complete(run_dir: str) -> tuple[str | None, list[str]]:
    """The newest checkpoint that is not cut (None if there is none) and the cut folders newer than it, upstream's
    staging folders included."""
    cut = []
    if os.path.isdir(run_dir):
        cut = [os.path.join(run_dir, n) for n in sorted(os.listdir(run_dir))
               if _STAGING.match(n) and os.path.isdir(os.path.join(run_dir, n))]
    for path in reversed(checkpoints(run_dir)):
        if not is_cut(path):
            return path, cut
        cut.append(path)
    return None, cut


def cut_line(path: str) -> str:
    return (f"[vlm-preserve] {path} is incomplete (its write was cut, e.g. the process was killed while saving): not "
            "resumed from; the step's next save replaces it. To resume from it anyway, pass its path as "
            "resume_from_checkpoint.")

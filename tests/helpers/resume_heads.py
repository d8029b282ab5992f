"""The heads' resume check shared by the framework tests (LLaMA-Factory, ms-swift): a run that saved checkpoints at
steps 2 and 4 is resumed from its checkpoint-2 in a second folder, and must start from the heads saved there."""
import shutil

import torch
from safetensors.torch import load_file

HEADS = "vlm_preserve_heads.safetensors"


def saved_heads_copied(full, b) -> dict:
    """checkpoint-2's heads of the run in `full` (which trained them: checkpoint-4's differ), that checkpoint copied
    into the new folder `b`."""
    saved, later = load_file(full / "checkpoint-2" / HEADS), load_file(full / "checkpoint-4" / HEADS)
    assert saved and any(not torch.equal(saved[k], later[k]) for k in saved)
    b.mkdir()
    shutil.copytree(full / "checkpoint-2", b / "checkpoint-2")
    return saved


def heads_at_start():
    """(callback, seen): the callback fills `seen` with the model's heads as training begins."""
    from transformers import TrainerCallback
    seen = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            heads = next(m for m in model.modules() if hasattr(m, "vlm_preserve_heads")).vlm_preserve_heads
            seen.update({k: v.detach().clone() for k, v in heads.state_dict().items()})
    return AtStart(), seen


def assert_resumed_from(seen: dict, saved: dict, b) -> None:
    """Training began from the saved heads (`seen` keys lack the method prefix where the heads are one module), and
    the resumed run went on saving them."""
    assert seen and {k if k.startswith("pre.") else f"pre.{k}" for k in seen} == set(saved)
    assert all(torch.equal(seen[k if k in seen else k[len("pre."):]], v) for k, v in saved.items())
    assert (b / "checkpoint-4" / HEADS).exists()

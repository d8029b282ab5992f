"""Our LLaVA launch scripts pass only flags that upstream's dataclasses or ours define."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import needs_llava

ROOT = Path(__file__).resolve().parents[1]


@needs_llava
@pytest.mark.parametrize("script,reg", [("finetune.sh", "rdd,pre"), ("finetune.sh", "attention_tuning"),
                                        ("finetune_lora.sh", "pre"), ("pretrain.sh", "rdd"),
                                        ("finetune.sh", "soft_label")])
def test_launch_script_flags_are_all_known(script, reg):
    import transformers
    from llava.train import train as upstream

    from vlm_preserve.cli.llava_train import _parser
    p = subprocess.run(["bash", ROOT / "scripts" / "llava" / script, reg], capture_output=True, text=True,
                       env=dict(os.environ, DRY_RUN="1", LLAVA_TRAIN="llava-train"))
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout.replace("\\\n", " "))
    args = words[words.index("llava-train") + 1:]
    ours, rest = _parser().parse_known_args(args)
    assert ours.regularizer == reg
    up = transformers.HfArgumentParser((upstream.ModelArguments, upstream.DataArguments, upstream.TrainingArguments))
    _, unknown = up.parse_known_args(rest)
    assert unknown == []
    assert "--deepspeed" in rest and Path(rest[rest.index("--deepspeed") + 1]).exists()

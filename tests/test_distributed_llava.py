"""Upstream LLaVA's LlavaLlamaForCausalLM under DeepSpeed ZeRO-3 on 2 CPU processes (gloo), driven through
`deepspeed.initialize` with the plugin's Attachment (tests/helpers/llava_distributed_worker.py; why not through train():
docs/scale-out.md). Rank 0's batch is text-only, rank 1's has an image: the image terms take their weight-0 path on
rank 0 (the PRe head still runs, on a placeholder) while the teacher runs on both. Every value of both steps
equals the single-process run on the same two batches (accumulated): within 1e-4 relative or 1e-6 absolute
(measured: distill, a KL between nearly equal distributions, differs by 3.5e-7 absolute; the rest by < 5e-7
relative; fp32 summation order only)."""
import json
import sys

import pytest

from conftest import needs_llava
from helpers.distributed_runs import ROOT, launch

pytestmark = needs_llava
pytest.importorskip("deepspeed")


def test_llava_zero3_text_only_rank_equals_single_process(tiny_llava, tmp_path):
    worker = [str(ROOT / "tests" / "helpers" / "llava_distributed_worker.py"), str(tiny_llava.root)]
    launch([sys.executable, *worker, str(tmp_path / "ref.json"), "0"], "single-process reference")
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *worker, str(tmp_path / "z3.json"),
          "3"], "upstream LLaVA under ZeRO-3 on 2 processes")
    want, got = (json.loads((tmp_path / f).read_text()) for f in ("ref.json", "z3.json"))
    assert len(got) == len(want) == 2
    for step_got, step_want in zip(got, want):
        assert step_got[0]["rdd_loss"] is None and step_got[0]["pre_loss"] is None  # rank 0: no image
        for g, w in zip(step_got, step_want):
            assert g.keys() == w.keys() == {"loss", "lm_loss", "rdd_loss", "pre_loss", "distill_loss"}
            for k in w:
                assert (g[k] is None) == (w[k] is None), (k, g, w)
                if w[k] is not None:
                    assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (k, g, w)

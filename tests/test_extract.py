"""`vlm-preserve extract-llm`: the extracted folder loads with AutoModelForCausalLM and gives the same logits on
text as the VLM's language model inside the VLM (loaded by the VLM's own class)."""
import json

import pytest
import torch

from helpers.checkpoint_models import ADDED, base_llm, build_vlm
from conftest import needs_llava
from vlm_preserve.cli import main


def _ids(vocab: int):
    return torch.randint(0, vocab - ADDED, (2, 12), generator=torch.Generator().manual_seed(0))


def _new_layout_supported():
    import transformers
    return tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 52)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return base_llm(tmp_path_factory.mktemp("extract") / "base")


@pytest.mark.parametrize("layout", ["native-new", "native-old"])
def test_native_extracted_llm_gives_the_same_logits(base, tmp_path, layout):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration
    if layout == "native-new" and not _new_layout_supported():
        pytest.skip("this transformers predates the model.language_model layout (needs >= 4.52)")
    vlm = build_vlm(layout, tmp_path / "vlm", base)
    assert main(["extract-llm", str(vlm), "--out", str(tmp_path / "llm")]) == 0
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    assert type(llm).__name__ == "LlamaForCausalLM"
    ref = LlavaForConditionalGeneration.from_pretrained(vlm).eval()
    ids = _ids(llm.config.vocab_size)
    with torch.no_grad():
        # transformers 4.36's Llava runs the LM from inputs_embeds (another attention path): equal to rounding
        torch.testing.assert_close(llm(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "llm")) == llm.config.vocab_size  # the VLM's tokenizer
    assert not json.loads((tmp_path / "llm" / "config.json").read_text())["tie_word_embeddings"]


def test_nvila_extracted_llm_is_its_llm_folder(base, tmp_path):
    from transformers import AutoModelForCausalLM
    vlm = build_vlm("nvila", tmp_path / "vlm", base)
    assert main(["extract-llm", str(vlm), "--out", str(tmp_path / "llm")]) == 0
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    ref = AutoModelForCausalLM.from_pretrained(vlm / "llm").eval()
    ids = _ids(llm.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_unknown_language_model_type_fails_clearly(base, tmp_path, capsys):
    vlm = build_vlm("llava", tmp_path / "vlm", base)
    cfg = json.loads((vlm / "config.json").read_text())
    (vlm / "config.json").write_text(json.dumps(dict(cfg, model_type="llava_unknownlm")))
    assert main(["extract-llm", str(vlm), "--out", str(tmp_path / "llm")]) == 2
    assert "model_type 'llava_unknownlm', which has no plain CausalLM class" in capsys.readouterr().err
    assert not (tmp_path / "llm").exists()


@pytest.fixture(scope="module")
def upstream_llava(tiny_llava, tmp_path_factory):
    """A real upstream LlavaLlamaForCausalLM (vision modules initialised, 2 tokens added), saved by upstream."""
    from types import SimpleNamespace

    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("upstream_llava") / "vlm"
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava.llm)
    args = SimpleNamespace(vision_tower=str(tiny_llava.vision), mm_vision_select_layer=-2,
                           mm_vision_select_feature="patch", pretrain_mm_mlp_adapter=None,
                           mm_projector_type="mlp2x_gelu", mm_patch_merge_type="flat")
    model.get_model().initialize_vision_modules(args)
    tok = AutoTokenizer.from_pretrained(tiny_llava.llm, use_fast=False)
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():  # the VLM's language model moves away from the LLM it started from
        for p in model.get_model().layers.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@needs_llava
def test_upstream_llava_extract_and_merge(upstream_llava, tiny_llava, tmp_path):
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoModelForCausalLM
    assert main(["extract-llm", str(upstream_llava), "--out", str(tmp_path / "llm")]) == 0
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    ref = LlavaLlamaForCausalLM.from_pretrained(upstream_llava).eval()
    ids = _ids(llm.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids).logits, ref(input_ids=ids).logits)

    # merge: the output loads with upstream's class; projector unchanged, added rows kept, shared rows merged
    assert main(["merge", "--vlm", str(upstream_llava), "--base-llm", str(tiny_llava.llm), "--alpha", "0.5",
                 "--out", str(tmp_path / "merged"), "--no-progress"]) == 0
    merged = LlavaLlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llava.llm).eval()
    for (name, p), q in zip(merged.get_model().mm_projector.named_parameters(), ref.get_model().mm_projector.parameters()):
        assert torch.equal(p, q), name
    e_m, e_v, e_b = (m.get_input_embeddings().weight for m in (merged, ref, base))
    n = e_b.shape[0]
    assert torch.equal(e_m[n:], e_v[n:]) and e_m.shape[0] == n + 2
    assert torch.equal(e_m[:n], e_v[:n] + (e_b - e_v[:n]) * 0.5)


_SLOW_WRITES = ("import sys, time\n"
                "from vlm_preserve.offline import writing as c\n"
                "orig = c.ShardWriter.write\n"
                "def write(self, *a):\n"
                "    orig(self, *a); self.file.flush(); print('WRITING', flush=True); time.sleep(0.5)\n"
                "c.ShardWriter.write = write\n"
                "from vlm_preserve.cli import main\n"
                "main(sys.argv[1:])\n")


def _digest(folder):
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_extract_killed_midway_leaves_no_output_and_a_rerun_succeeds(base, tmp_path):
    """SIGKILL while a shard is being written: `--out` never appears half-written; the next run removes the partial
    folder and succeeds."""
    import signal
    import subprocess
    import sys
    vlm, out = build_vlm("native-old", tmp_path / "vlm", base), tmp_path / "llm"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITES, "extract-llm", str(vlm), "--out", str(out)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "WRITING"
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = list(tmp_path.glob(".llm.partial-*"))
    assert not out.exists() and len(partial) == 1 and any(f.stat().st_size for f in partial[0].rglob("*"))
    assert main(["extract-llm", str(vlm), "--out", str(out)]) == 0
    assert (out / "config.json").exists() and not list(tmp_path.glob(".llm.partial-*"))


_LIMITED = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG instead of killing us\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))\n"
            "from vlm_preserve.cli import main\n"
            "sys.exit(main(sys.argv[2:]))\n")


@pytest.mark.parametrize("tool", ["extract-llm", "merge"])
def test_no_space_gives_one_line_with_the_path_and_the_space_and_leaves_nothing(base, tmp_path, tool):
    """A file-size limit (ulimit -f) stands in for a full disk: the tool fails with one line naming the output and
    the space it needs; no output, no partial folder, the inputs byte for byte as before."""
    import subprocess
    import sys
    vlm, out = build_vlm("native-old", tmp_path / "vlm", base), tmp_path / "out"
    before = (_digest(vlm), _digest(base))
    args = (["extract-llm", str(vlm)] if tool == "extract-llm" else
            ["merge", "--vlm", str(vlm), "--base-llm", str(base), "--alpha", "0.5", "--no-progress"])
    r = subprocess.run([sys.executable, "-c", _LIMITED, "20000", *args, "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert lines[-1].startswith(f"vlm-preserve {tool}: could not write ") and str(out) in lines[-1]
    assert "a file-size limit (ulimit -f) refused the write; the output needs about " in lines[-1]
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert (_digest(vlm), _digest(base)) == before


def test_not_enough_free_space_is_refused_before_writing(base, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    vlm = build_vlm("native-old", tmp_path / "vlm", base)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    from vlm_preserve.config import ConfigError
    from vlm_preserve.offline.extract import extract_llm
    with pytest.raises(ConfigError, match=r"not enough space for .*llm: the output needs about [\d.]+ MiB, 0\.0 MiB "
                                          "are free on its disk. Free space or choose another --out; nothing was "
                                          "written."):
        extract_llm(str(vlm), str(tmp_path / "llm"))
    assert not (tmp_path / "llm").exists() and not list(tmp_path.glob(".llm.partial-*"))

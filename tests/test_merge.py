"""`vlm-preserve merge` on tiny checkpoints of every layout written at test time: merged tensors equal the
formula exactly, everything else is byte-identical, added-token rows are the VLM's, outputs are atomic, bad
inputs fail naming the tensor, and the output loads with the VLM's own class."""
import hashlib
import json
import signal
import subprocess
import sys

import pytest
import torch

from helpers.checkpoint_models import ADDED, base_llm, build_vlm, llm_tensors, read_all, to_llm
from vlm_preserve.cli import main

LAYOUTS = ("native-new", "native-old", "llava", "llava-bin", "nvila")
ALPHAS = (0.1, 0.5)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = base_llm(root / "base")
    return root, base, {layout: build_vlm(layout, root / layout, base) for layout in LAYOUTS}


def run_merge(vlm, base, out, *extra):
    return main(["merge", "--vlm", str(vlm), "--base-llm", str(base), "--out", str(out), "--no-progress", *extra])


def layout_of(name):
    return "llava" if name == "llava-bin" else name


def expected(method, vlm, llm, alpha, density):
    tau = llm - vlm
    if method == "magnitude":
        k = round(density * tau.numel())
        t = tau.abs().flatten().sort(descending=True).values[k - 1]
        tau = tau * (tau.abs() >= t)
    return vlm + tau * alpha


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method,density", [("none", 1.0), ("magnitude", 0.3), ("dare", 0.5)])
def test_merged_tensors_equal_the_formula(ckpts, tmp_path, monkeypatch, layout, method, density):
    # steps of 7 elements: every tensor spans several steps of the arithmetic, most end in a partial one
    monkeypatch.setattr("vlm_preserve.offline.merge.CHUNK", 7)
    root, base, vlms = ckpts
    out = tmp_path / "out"
    assert run_merge(vlms[layout], base, out, "--alpha", ",".join(map(str, ALPHAS)), "--sparsify", method,
                     "--density", str(density), "--seed", "7") == 0
    v, b = read_all(vlms[layout]), llm_tensors(base)
    merged = {a: read_all(out / f"alpha-{a:g}") for a in ALPHAS}
    n_merged = kept = total = 0
    masks = {}
    for alpha in ALPHAS:
        m = merged[alpha]
        assert set(m) == set(v)
        for name, t in v.items():
            llm = to_llm(layout_of(layout), name)
            if llm is None:  # vision tower, projector: byte-identical
                assert m[name].dtype == t.dtype and torch.equal(m[name].view(torch.uint8), t.view(torch.uint8)), name
                continue
            n_merged += 1
            rows = b[llm].shape[0]
            if t.shape[0] != rows:  # added-token rows keep the VLM's values
                assert t.shape[0] == rows + ADDED and torch.equal(m[name][rows:], t[rows:]), name
            got, vv = m[name][:rows], t[:rows]
            if method == "dare":
                # each entry is either dropped (the VLM's value) or kept and rescaled: vlm + alpha * tau / K
                mask = got != vv
                want = vv + ((b[llm] - vv) / density) * alpha
                assert torch.equal(got[mask], want[mask]) and torch.equal(got[~mask], vv[~mask]), name
                masks.setdefault(name, mask)
                assert torch.equal(masks[name], mask), "the same mask for every alpha"
                kept, total = kept + int(mask.sum()), total + mask.numel()
            else:
                assert torch.equal(got, expected(method, vv, b[llm], alpha, density)), name
    assert n_merged > 0
    if method == "dare":
        assert abs(kept / total - density) < 0.02
        again = tmp_path / "again"
        run_merge(vlms[layout], base, again, "--alpha", "0.1", "--sparsify", "dare", "--density", "0.5", "--seed", "7")
        other = tmp_path / "other"
        run_merge(vlms[layout], base, other, "--alpha", "0.1", "--sparsify", "dare", "--density", "0.5", "--seed", "8")
        first = merged[0.1]
        assert all(torch.equal(first[k], x) for k, x in read_all(again).items()), "reproducible by seed"
        assert any(not torch.equal(first[k], x) for k, x in read_all(other).items()), "another seed, another mask"


def test_recipe_side_files_and_progress(ckpts, tmp_path):
    root, base, vlms = ckpts
    vlm, out = vlms["native-new"], tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", "from vlm_preserve.cli import entry; entry()", "merge", "--vlm", str(vlm),
                        "--base-llm", str(base), "--alpha", "0.2", "--density", "0.5", "--sparsify", "magnitude",
                        "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "merge: 100%" in p.stderr  # the progress bar reached the end
    recipe = json.loads((out / "vlm_preserve_merge.json").read_text())
    assert (recipe["alpha"], recipe["density"], recipe["sparsify"], recipe["layout"]) == (0.2, 0.5, "magnitude", "native-new")
    for key, folder in (("vlm", vlm), ("base_llm", base)):
        assert recipe[key]["path"] == str(folder)
        assert recipe[key]["sha256"]["model.safetensors"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert recipe[key]["sha256"]["config.json"]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (vlm / f).read_bytes()
    assert recipe["kept_vlm_rows"] == {"model.language_model.embed_tokens.weight": [len(llm_tensors(base)["model.embed_tokens.weight"]), len(llm_tensors(base)["model.embed_tokens.weight"]) + ADDED],
                                       "lm_head.weight": [len(llm_tensors(base)["lm_head.weight"]), len(llm_tensors(base)["lm_head.weight"]) + ADDED]}


def test_nvila_components_are_copied_as_files(ckpts, tmp_path):
    root, base, vlms = ckpts
    run_merge(vlms["nvila"], base, tmp_path / "out", "--alpha", "0.3")
    for f in ("vision_tower/model.safetensors", "mm_projector/model.safetensors", "config.json", "llm/config.json",
              "llm/tokenizer.json"):
        assert (tmp_path / "out" / f).read_bytes() == (vlms["nvila"] / f).read_bytes(), f


@pytest.mark.parametrize("layout", ["native-new", "native-old"])
def test_output_loads_with_the_vlm_class(ckpts, tmp_path, layout):
    from transformers import LlavaForConditionalGeneration
    if layout == "native-new" and not _new_layout_supported():
        pytest.skip("this transformers predates the model.language_model layout (needs >= 4.52)")
    root, base, vlms = ckpts
    out = tmp_path / "out"
    run_merge(vlms[layout], base, out, "--alpha", "0.4")
    model = LlavaForConditionalGeneration.from_pretrained(out)
    files = read_all(out)
    emb = files["model.language_model.embed_tokens.weight" if layout == "native-new" else "language_model.model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight, emb)
    head = files["lm_head.weight" if layout == "native-new" else "language_model.lm_head.weight"]
    assert torch.equal(model.get_output_embeddings().weight, head)


def _new_layout_supported():
    import transformers
    return tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 52)


def test_interrupted_merge_leaves_no_output(ckpts, tmp_path):
    """SIGKILL while the shards are being written: no output folder; the next merge to it succeeds."""
    root, base, vlms = ckpts
    out = tmp_path / "out"
    slow = ("import sys, time\n"
            "from vlm_preserve.offline import writing as c\n"
            "orig = c.ShardWriter.write\n"
            "def write(self, *a):\n"
            "    orig(self, *a); self.file.flush(); print('WRITING', flush=True); time.sleep(0.5)\n"
            "c.ShardWriter.write = write\n"
            "from vlm_preserve.cli import main\n"
            "main(sys.argv[1:])\n")
    p = subprocess.Popen([sys.executable, "-c", slow, "merge", "--vlm", str(vlms["llava"]), "--base-llm", str(base),
                          "--alpha", "0.1,0.2", "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "WRITING"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    partial = list(tmp_path.glob(".out.partial-*"))
    assert len(partial) == 1 and any(f.stat().st_size > 0 for f in partial[0].rglob("*.safetensors"))
    assert run_merge(vlms["llava"], base, out, "--alpha", "0.1,0.2") == 0
    assert sorted(p.name for p in out.iterdir()) == ["alpha-0.1", "alpha-0.2"]
    assert not list(tmp_path.glob(".out.partial-*")), "the stale partial output of the killed run is removed"


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=48), "tensor 'lm_head.weight': shape [{v}, 32] in the VLM but [{b}, 48] in --base-llm"),
    (dict(num_hidden_layers=1), "tensor 'model.language_model.layers.1.input_layernorm.weight' of the VLM's language model has no counterpart 'model.layers.1.input_layernorm.weight'"),
    (dict(num_hidden_layers=3), "--base-llm has 9 tensors the VLM's language model lacks, e.g. 'model.layers.2."),
    (dict(intermediate_size=80), "tensor 'model.language_model.layers.0.mlp.down_proj.weight': shape [32, 64] in the VLM but [32, 80]"),
])
def test_mismatched_inputs_fail_naming_the_tensor(ckpts, tmp_path, capsys, change, message):
    root, base, vlms = ckpts
    other = base_llm(tmp_path / "other", **change)
    v = llm_tensors(base)["model.embed_tokens.weight"].shape[0]
    assert run_merge(vlms["native-new"], other, tmp_path / "out", "--alpha", "0.1") == 2
    err = capsys.readouterr().err
    assert message.format(v=v + ADDED, b=v) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--alpha", "0.1", "--density", "0"], "--density 0.0 is out of range: the kept fraction K must be in (0, 1]"),
    (["--alpha", "0.1,0.1"], "--alpha 0.1,0.1 repeats a value"),
])
def test_bad_arguments(ckpts, tmp_path, capsys, args, message):
    root, base, vlms = ckpts
    assert run_merge(vlms["native-new"], base, tmp_path / "o", *args) == 2
    assert message in capsys.readouterr().err


def test_swapped_inputs_and_existing_output(ckpts, tmp_path, capsys):
    root, base, vlms = ckpts
    assert run_merge(base, vlms["native-new"], tmp_path / "o", "--alpha", "0.1") == 2
    assert "looks like a VLM (native-new layout): pass the plain CausalLM checkpoint" in capsys.readouterr().err
    existing = tmp_path / "exists"
    existing.mkdir()
    assert run_merge(vlms["native-new"], base, existing, "--alpha", "0.1") == 2
    assert "already exists: remove it or choose another folder" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["none", "magnitude"])
def test_bf16_with_a_wider_base_and_added_rows_across_steps(method):
    """The stepped arithmetic (float32 steps, one rounding to bf16) equals the whole-tensor formula bit for bit,
    with the base stored in float32 and 3 rows the VLM added, over several steps and a partial last one."""
    from vlm_preserve.offline.merge import CHUNK, merge_into, sparsify
    g = torch.Generator().manual_seed(0)
    cols = 512
    rows = (3 * CHUNK + 4 * cols) // cols
    base = torch.randn(rows, cols, generator=g)
    vlm = torch.cat([base + 0.01 * torch.randn(rows, cols, generator=g), torch.randn(3, cols, generator=g)])
    vlm = vlm.to(torch.bfloat16)
    alphas = [0.1, 0.37]
    outs = merge_into([torch.empty_like(vlm) for _ in alphas], vlm, base, alphas, method, 0.3, 0, "w", rows)
    tau = sparsify(base - vlm[:rows].float(), method, 0.3)
    for o, a in zip(outs, alphas):
        assert torch.equal(o[:rows], (vlm[:rows].float() + tau * a).to(torch.bfloat16))
        assert torch.equal(o[rows:], vlm[rows:])


def test_sha256_is_folded_into_the_read_pass(tmp_path):
    """The recipe's sha256 comes from the bytes the merge reads: every file's hash is right whatever order its bytes
    are handed over in (out of order, twice, never), and bytes handed over in file order are not read again (the
    hasher reads only the shards' headers and the side files itself)."""
    from safetensors.torch import save_file

    from vlm_preserve.offline.checkpoints import Checkpoint
    from vlm_preserve.offline.writing import Hasher
    g = torch.Generator().manual_seed(0)
    for k in range(2):
        save_file({f"model.layers.{k}.w{i}": torch.randn(64, 33, generator=g) for i in range(5)},
                  str(tmp_path / f"model-0000{k + 1}-of-00002.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    ck = Checkpoint(tmp_path)
    in_order = sorted(ck.names, key=lambda n: (ck.file_of(n), ck.offset(n)))
    for names in (in_order, in_order[::-1], in_order[:3] + in_order[1:2] + in_order[6:]):
        h = Hasher(tmp_path)
        for n in names:
            ck.get(n, seen=lambda *a: h.seen(*a).result())
        assert h.hashes() == {str(tmp_path): want}
        if names is in_order:
            tensor_bytes = 10 * 64 * 33 * 4
            assert h.read_here == sum(p.stat().st_size for p in tmp_path.iterdir()) - tensor_bytes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_tensors_merged_in_row_pieces_give_the_same_files(ckpts, tmp_path, monkeypatch, layout):
    """With sparsify none a tensor larger than PIECE bytes is read, merged and written in row ranges: with PIECE at
    200 bytes (about one row per piece, pieces across the added-token rows and the base's end), every output file
    is byte-identical to the whole-tensor merge, and the recipe's counts and hashes are the same."""
    root, base, vlms = ckpts
    args = ("--alpha", ",".join(map(str, ALPHAS)))
    assert run_merge(vlms[layout], base, tmp_path / "whole", *args) == 0
    monkeypatch.setattr("vlm_preserve.offline.merge.PIECE", 200)
    assert run_merge(vlms[layout], base, tmp_path / "pieces", *args) == 0
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "pieces") for p in (tmp_path / "pieces").rglob("*") if p.is_file())
    for f in files:
        a, b = (tmp_path / "whole" / f).read_bytes(), (tmp_path / "pieces" / f).read_bytes()
        if f.name == "vlm_preserve_merge.json":
            a, b = ({k: v for k, v in json.loads(x).items() if k != "seconds"} for x in (a, b))
        assert a == b, f


def test_arithmetic_runs_on_one_torch_thread_and_the_count_is_restored(ckpts, tmp_path, monkeypatch):
    """The merge's small elementwise steps run on one torch thread (on 2 cores, intra-op threads spinning between
    them took the reader's, writer's and hasher's CPU: docs/benchmarks.md, merge at 7B); the caller's thread count
    comes back afterwards, also when the merge fails."""
    import vlm_preserve.offline.merge as m
    root, base, vlms = ckpts
    seen, real = [], m.merge_into
    monkeypatch.setattr(m, "merge_into", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run_merge(vlms["native-new"], base, tmp_path / "out", "--alpha", "0.1") == 0
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(m, "merge_into", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            run_merge(vlms["native-new"], base, tmp_path / "failed", "--alpha", "0.1")
        assert torch.get_num_threads() == 2 and not (tmp_path / "failed").exists()
    finally:
        torch.set_num_threads(before)

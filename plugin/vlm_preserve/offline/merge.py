"""ModelMerge (arXiv 2412.03467; METHODS.md §4): training-free, put the original LLM back into a VLM's language
model.

    τ = θ_llm − θ_vlm                      (parameters both have: the VLM's language model)
    θ_merged = θ_vlm + α · Sparsify_K(τ)

Sparsify_K, per tensor, with K = `density` in (0, 1]:
- `none`: τ.
- `magnitude`: τ ⊙ [|τ| ≥ t], t the k-th largest |τ|, k = round(K · numel) (ties at t are all kept).
- `dare`: (τ ⊙ m) / K with m ~ Bernoulli(K) drawn from `torch.Generator().manual_seed(tensor_seed(seed, name))`,
  so the mask depends on the seed and the tensor's name only, never on shard order or the other tensors.

Arithmetic is in float32 (float64 for float64 tensors), written back in the VLM's dtype. Vision tower and
projector are copied unchanged. Embedding rows the VLM added (new tokens) keep the VLM's values; the shared
rows merge (Sparsify_K over the shared rows). Several α are written in one pass over the inputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from .checkpoints import EMBEDDING_SUFFIXES, Checkpoint, llm_name
from .writing import Hasher, ShardWriter, atomic_dir, copy_side_files, nbytes, progress, shard_names, write_index

SPARSIFIERS = ("none", "magnitude", "dare")


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def sparsify(tau, method: str, density: float, seed: int = 0, name: str = ""):
    import torch
    if method == "none":
        return tau
    if method == "magnitude":
        k = round(density * tau.numel())
        if k >= tau.numel():
            return tau
        if k == 0:
            return torch.zeros_like(tau)
        mag = tau.abs()
        t = mag.reshape(-1).kthvalue(tau.numel() - k + 1).values
        return tau * (mag >= t)
    if method == "dare":
        g = torch.Generator().manual_seed(tensor_seed(seed, name))
        keep = torch.rand(tau.shape, generator=g) < density
        return (tau * keep) / density
    raise ValueError(method)


@dataclass
class _Item:
    name: str                 # in the VLM (and the output)
    dtype: str
    shape: tuple
    llm: str | None = None    # counterpart in the base LLM; None = copied unchanged
    shared_rows: int | None = None  # set when the VLM added embedding rows


def plan(vlm: Checkpoint, base: Checkpoint) -> list[_Item]:
    """Pair every VLM tensor with its base-LLM counterpart, checking names and shapes before anything runs."""
    if base.layout != "causal-lm":
        raise ConfigError(f"--base-llm {base.path} looks like a VLM ({base.layout} layout): pass the plain "
                          f"CausalLM checkpoint the VLM was built from (tensors model.*, lm_head.*).")
    base_names = set(base.names)
    items, used = [], set()
    for name in vlm.names:
        dtype, shape = vlm.spec(name)
        item = _Item(name, dtype, shape, llm_name(vlm.layout, name))
        if item.llm is not None and dtype in ("F32", "F16", "BF16", "F64"):
            if item.llm not in base_names:
                raise ConfigError(f"tensor {name!r} of the VLM's language model has no counterpart {item.llm!r} in "
                                  f"--base-llm {base.path}: pass the LLM this VLM was built from.")
            _, bshape = base.spec(item.llm)
            if bshape != shape:
                added = (len(shape) == 2 and shape[1:] == bshape[1:] and shape[0] > bshape[0]
                         and name.endswith(EMBEDDING_SUFFIXES))
                if not added:
                    raise ConfigError(f"tensor {name!r}: shape {list(shape)} in the VLM but {list(bshape)} in "
                                      f"--base-llm ({item.llm!r}); only embedding rows added for new tokens may "
                                      f"differ. Is --base-llm the LLM this VLM was built from?")
                item.shared_rows = bshape[0]
            used.add(item.llm)
        else:  # vision/projector tensors, and integer buffers, are copied unchanged
            used.add(item.llm)
            item.llm = None
        items.append(item)
    unused = sorted(n for n in base_names - used if not n.startswith("lm_head."))  # lm_head absent = tied in VLM
    if unused:
        raise ConfigError(f"--base-llm has {len(unused)} tensors the VLM's language model lacks, e.g. {unused[0]!r}: "
                          f"the two models differ in architecture.")
    return items


CHUNK = 1 << 18  # elements per step of the arithmetic: the float32 working set (3 MiB) stays in cache (measured 4x
# faster than whole-tensor float32 temporaries, which spend their time on memory traffic and page faults); fewer
# steps than 1 << 16, whose per-op overhead cost 1.4x the CPU (docs/benchmarks.md, merge at 7B, the rerun)


def merge_into(outs, vlm_t, llm_t, alphas, method: str, density: float, seed: int, name: str, shared_rows=None):
    """outs[i] (tensors shaped and typed like `vlm_t`) = θ_vlm + α_i · Sparsify_K(θ_llm − θ_vlm), computed in
    float32 (float64 for float64 tensors) as v + (s · α) and rounded once to the VLM's dtype."""
    import torch
    work = torch.float64 if vlm_t.dtype == torch.float64 else torch.float32
    shared = vlm_t if shared_rows is None else vlm_t[:shared_rows]
    n = shared.numel()
    v, flat = vlm_t.reshape(-1), [o.reshape(-1) for o in outs]
    for o in flat:  # the rows the VLM added keep its values
        o[n:] = v[n:]
    # magnitude/DARE need the whole difference (a threshold over all of it, a mask drawn over its shape)
    s = None if method == "none" else sparsify(torch.sub(llm_t.to(work), shared.to(work)), method, density, seed,
                                               name).reshape(-1)  # not in place: .to() of a float32 input is itself
    l = llm_t.reshape(-1)
    x, d, y = (torch.empty(min(CHUNK, n), dtype=work) for _ in range(3))
    for i in range(0, n, CHUNK):
        j = min(i + CHUNK, n)
        xi, di, yi = x[:j - i], d[:j - i], y[:j - i]
        xi.copy_(v[i:j])
        if s is None:
            di.copy_(l[i:j]).sub_(xi)
        else:
            di = s[i:j]
        for o, a in zip(flat, alphas):
            torch.mul(di, a, out=yi).add_(xi)
            o[i:j].copy_(yi)
    return outs


def _check(alphas, method, density):
    if not alphas:
        raise ConfigError("--alpha: give at least one value, e.g. --alpha 0.1 or --alpha 0.1,0.2,0.4")
    if len(set(alphas)) != len(alphas):
        raise ConfigError(f"--alpha {','.join(map(str, alphas))} repeats a value: each α writes one model.")
    if method not in SPARSIFIERS:
        raise ConfigError(f"--sparsify {method!r} is not one of: {', '.join(SPARSIFIERS)}")
    if not 0 < density <= 1:
        raise ConfigError(f"--density {density} is out of range: the kept fraction K must be in (0, 1].")


def alpha_dir(a: float) -> str:
    return f"alpha-{a:g}"


def merge(vlm: str, base_llm: str, alphas, out: str, *, density: float = 1.0, sparsify_method: str = "none",
          seed: int = 0, show_progress: bool = True) -> list[Path]:
    """Write the merged VLM to `out` (one α), or `out/alpha-<α>/` for each of several α. Returns the folders."""
    alphas = [float(a) for a in alphas]
    _check(alphas, sparsify_method, density)
    v, b = Checkpoint(vlm), Checkpoint(base_llm)
    items = plan(v, b)
    hasher = Hasher(v.path, b.path)
    t0 = time.time()
    subdirs = [""] if len(alphas) == 1 else [alpha_dir(a) for a in alphas]
    by_file: dict[str, list[_Item]] = {}
    for it in items:
        by_file.setdefault(v.file_of(it.name), []).append(it)
    for its in by_file.values():  # each file front to back: read once, and hashed from that read
        its.sort(key=lambda it: v.offset(it.name))
    # NVILA components without LLM tensors (vision_tower/, mm_projector/) are copied as files, byte for byte.
    copied_parts = {p for p in v.parts if p and not any(llm_name(v.layout, p + n) for n in v.parts[p].files)}
    written_parts = [p for p in v.parts if p not in copied_parts]
    written = [it for it in items if not any(it.name.startswith(p) for p in copied_parts)]
    pieces = {f: list(_pieces(its, b, whole=sparsify_method != "none")) for f, its in by_file.items()}
    written_pieces = [pc for f, pcs in pieces.items() for pc in pcs if not f.startswith(tuple(copied_parts))]
    bar = progress(sum(nbytes(it.dtype, it.shape) for it in written), "merge") if show_progress else None
    stats = {"merged_tensors": 0, "copied_tensors": 0, "kept_vlm_rows": {}}
    io = _Streams(v, b, max((max(pc.vlm_bytes, pc.base_bytes) for pc in written_pieces), default=0), len(alphas),
                  hasher)
    # every output is about the VLM's size (its files, merged or copied)
    need = len(subdirs) * sum(f.stat().st_size for f in v.path.rglob("*") if f.is_file())
    with atomic_dir(out, need=need) as tmp, io, _one_thread():
        roots = [tmp / s for s in subdirs]
        for root in roots:
            _copy_tree_except_weights(v, root, copied_parts)
        for part in written_parts:
            files = {f: its for f, its in by_file.items() if (Path(f).parent.name + "/" if part else "") == part}
            names = shard_names(len(files))
            for (src, its), dst in zip(files.items(), names):
                rel = Path(part) / dst
                writers = [ShardWriter(root / rel, [(i.name[len(part):], i.dtype, i.shape) for i in its])
                           for root in roots]
                for pc, t, l in io.pairs(pieces[src]):
                    it, outs = pc.item, io.outputs(t)
                    if it.llm is None:
                        outs = [outs[0].copy_(t)] * len(roots)
                    else:
                        merge_into(outs, t, l, alphas, sparsify_method, density, seed, it.name, pc.shared_rows)
                    if pc.last:
                        stats["copied_tensors" if it.llm is None else "merged_tensors"] += 1
                        if it.shared_rows is not None:
                            stats["kept_vlm_rows"][it.name] = [it.shared_rows, it.shape[0]]
                    io.write(writers, it.name[len(part):], outs)
                    if bar:
                        bar.update(pc.vlm_bytes)
                io.close(writers)
            for root in roots:
                write_index(root / part, {n: [i.name[len(part):] for i in its]
                                          for n, its in zip(names, files.values())},
                            sum(nbytes(i.dtype, i.shape) for its in files.values() for i in its))
        hashes = hasher.hashes()
        for a, root in zip(alphas, roots):
            recipe = {"method": "modelmerge", "formula": "theta = theta_vlm + alpha * Sparsify_K(theta_llm - theta_vlm)",
                      "alpha": a, "density": density, "sparsify": sparsify_method, "seed": seed, "layout": v.layout,
                      "vlm": {"path": str(v.path.absolute()), "sha256": hashes[str(v.path)]},
                      "base_llm": {"path": str(b.path.absolute()), "sha256": hashes[str(b.path)]},
                      **stats, "seconds": round(time.time() - t0, 2)}
            (root / "vlm_preserve_merge.json").write_text(json.dumps(recipe, indent=2) + "\n")
    if bar:
        bar.close()
    out = Path(out).absolute()
    return [out / s if s else out for s in subdirs]


PIECE = 1 << 26  # bytes: where the merge is elementwise (sparsify none), a larger tensor is read, merged and
# written in row ranges of at most this size, so the buffers below (6 of them for one α) stay small whatever the
# model: a 7B model's embedding is 250 MiB in bf16


@dataclass
class _Piece:
    item: _Item
    rows: tuple | None        # (first, end) row of the VLM tensor; None = the whole tensor
    base_rows: tuple | None   # the same rows of the base tensor (fewer where the VLM added rows)
    shared_rows: int | None   # merge_into's: rows of this piece that the base has (None: all, no rows added)
    vlm_bytes: int
    base_bytes: int
    last: bool


def _pieces(its: list[_Item], base: Checkpoint, whole: bool):
    for it in its:
        vb = nbytes(it.dtype, it.shape)
        bspec = base.spec(it.llm) if it.llm else None
        bb = nbytes(*bspec) if bspec else 0
        n = it.shape[0] if it.shape else 0
        if (whole and it.llm) or n <= 1 or max(vb, bb) <= PIECE:
            yield _Piece(it, None, None, it.shared_rows, vb, bb, True)
            continue
        step = max(1, PIECE * n // max(vb, bb))
        for r in range(0, n, step):
            e = min(r + step, n)
            s_rows = None if it.shared_rows is None else max(0, min(e, it.shared_rows) - r)
            br = None if not it.llm else (min(r, bspec[1][0]), min(e, bspec[1][0]))
            yield _Piece(it, (r, e), br, s_rows, vb * (e - r) // n, 0 if br is None else bb * (br[1] - br[0]) // bspec[1][0],
                         e == n)


@contextlib.contextmanager
def _one_thread():
    """torch ops on one thread here: split over its intra-op threads, each chunk's ops left those threads spinning
    between ops on the cores that the reader, writer and hasher threads need (7B merge on 2 cores: 25 s of CPU for the
    arithmetic instead of 7.5; docs/benchmarks.md, merge at 7B, the rerun)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Streams:
    """Double-buffered I/O around the arithmetic. Inputs are read one item ahead and outputs written one item
    behind, each on its own thread (file reads and writes release the GIL), into buffers allocated once (a
    fresh large allocation costs a page fault per 4 KiB). Every input read is handed to the hasher, and an input
    buffer is read into again only once its bytes are hashed."""

    def __init__(self, vlm: Checkpoint, base: Checkpoint, size: int, n_out: int, hasher: Hasher):
        import torch
        from concurrent.futures import ThreadPoolExecutor
        self.vlm, self.base = vlm, base
        new = lambda: torch.empty(size, dtype=torch.uint8)
        self.inputs = [(new(), new()) for _ in range(2)]
        self.out_sets = [[new() for _ in range(n_out)] for _ in range(2)]
        self.written = [None, None]  # the pending write of each output set
        self.hasher, self.hashing = hasher, [[], []]  # the pending hashes of each input slot
        self.k = -1                  # items handed out so far, minus one
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="merge-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="merge-write")

    def _read(self, pc: _Piece, slot: int):
        bv, bl = self.inputs[slot]
        for f in self.hashing[slot]:
            f.result()
        futures = self.hashing[slot] = []
        seen = lambda *a: futures.append(self.hasher.seen(*a))  # noqa: E731
        it = pc.item
        return (pc, self.vlm.get(it.name, bv, seen, pc.rows),
                None if it.llm is None else self.base.get(it.llm, bl, seen, pc.base_rows))

    def pairs(self, items: list[_Piece]):
        """(piece, VLM tensor, base tensor or None); the tensors stay valid until the next piece is asked for."""
        nxt = self.reader.submit(self._read, items[0], (self.k + 1) % 2) if items else None
        for i in range(len(items)):
            cur = nxt.result()
            self.k += 1
            if i + 1 < len(items):
                nxt = self.reader.submit(self._read, items[i + 1], (self.k + 1) % 2)
            yield cur

    def outputs(self, like) -> list:
        """The output tensors (shaped and typed like `like`) for the current item, once their last write ended."""
        slot = self.k % 2
        if self.written[slot] is not None:
            self.written[slot].result()
        n = like.numel() * like.element_size()
        return [o[:n].view(like.dtype).reshape(like.shape) for o in self.out_sets[slot]]

    def write(self, writers, name: str, outs) -> None:
        self.written[self.k % 2] = self.writer.submit(lambda: [w.write(name, o) for w, o in zip(writers, outs)])

    def close(self, writers) -> None:
        self.writer.submit(lambda: [w.close() for w in writers]).result()
        for f in self.written:
            if f is not None:
                f.result()  # surface a failed write

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True, cancel_futures=True)


def _copy_tree_except_weights(v: Checkpoint, root: Path, copied_parts) -> None:
    copy_side_files(v.path, root, keep=lambda p: p.name != "vlm_preserve_merge.json")
    for part in v.parts:
        if part in copied_parts:
            shutil.copytree(v.path / part, root / part)
        elif part:
            copy_side_files(v.path / part, root / part)
    for sub in v.path.iterdir():  # NVILA folders without weights (e.g. a tokenizer folder)
        if sub.is_dir() and not sub.name.startswith(".") and sub.name + "/" not in v.parts and v.layout == "nvila":
            shutil.copytree(sub, root / sub.name)

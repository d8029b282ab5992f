"""Where the plugin meets each training framework: one module per framework, what it hooks and how.

- `upstream.py`: codebases that run their own `train()` (LLaVA, Bunny, NVILA): their spec, preflight, and the
  rebinding of their Trainer name; `llava.py`, `bunny.py`, `nvila.py`: each one's spec.
- `llamafactory.py`: LLaMA-Factory's `run_exp` with its SFT trainer and log callback rebound.
- `swift.py` (+ `swift_plugin/`, the file ms-swift's `--external_plugins` imports): ms-swift's TrainerFactory entry.
- Any `transformers.Trainer` (TRL included) needs no module here: `attach()` (api.py) and `trainer.py`.

`cli/` parses the flags and launches these; nothing here imports `cli/`.
"""

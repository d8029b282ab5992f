"""Test-only helpers: tiny models, checkpoints, trainers and the multi-process workers the tests launch."""

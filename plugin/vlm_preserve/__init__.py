"""vlm-preserve-plugin: keep a VLM's language ability (and its visual representations) during
vision-language instruction tuning, inside the training codebases people already use.

Import stays light (no torch) so the console scripts answer `--help` at once.
"""
__version__ = "0.1.0"

"""vlm-preserve-plugin: keep a VLM's language ability (and its visual representations) during
vision-language instruction tuning, inside the training codebases people already use.

    from vlm_preserve import attach, RDDConfig, PReConfig, GenericAdapter

Import stays light (torch loads on first use of an attribute) so the console scripts answer `--help` at once.
"""
__version__ = "0.1.0"

_LAZY = {
    "attach": "api", "detach": "api", "preserving_class": "api", "make_configs": "api", "TrainerHandle": "api",
    "Attachment": "attachment", "GenericAdapter": "adapters.generic", "Preserver": "regularizers",
    "RDDConfig": "regularizers.rdd", "PReConfig": "regularizers.pre",
    "DistillConfig": "regularizers.distill", "SoftLabelConfig": "regularizers.soft_label",
    "PreserveArguments": "config", "ConfigError": "config", "NonFiniteTermError": "config", "StepCapture": "capture",
    "add_language_monitor": "monitor", "LanguageMonitorConfig": "monitor", "language_nll": "monitor",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'vlm_preserve' has no attribute {name!r}")

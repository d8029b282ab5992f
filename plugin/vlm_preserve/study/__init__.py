"""A small real reproduction of the papers' table: SmolLM2-135M + EfficientNet-Lite0 on easy-vqa, language
ability on bigbench (`vlm-preserve study`, `vlm-preserve demo`; docs/results.md)."""

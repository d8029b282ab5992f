"""A small real reproduction of the papers' table: SmolLM2-135M + EfficientNet-Lite0 on easy-vqa, language ability as
chat-reply and plain-text likelihood on data from packages installed by name (`vlm-preserve study`,
`vlm-preserve demo`; docs/study.md, docs/results.md)."""

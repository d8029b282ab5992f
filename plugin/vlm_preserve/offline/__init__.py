"""Tools on saved checkpoints, no trainer involved: the checkpoint reader/writer, merge, extract-llm, eval-language."""

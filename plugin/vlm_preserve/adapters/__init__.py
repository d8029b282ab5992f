"""One module per upstream. Each answers the same questions — where are the embedding, projector and
decoder layers; how are image positions found; how is the trainer's loss reached; what must a
checkpoint exclude — and never computes a loss."""

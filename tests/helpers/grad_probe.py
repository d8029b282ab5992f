"""A TrainerCallback that records gradients at the first optimizer step (framework tests: LLaMA-Factory, ms-swift)."""


class GradProbe:
    """The gradient of every parameter whose name contains one of `parts`, at the first optimizer step
    (None for a parameter without one)."""

    def __init__(self, *parts):
        from transformers import TrainerCallback
        self.parts, self.grads = parts, {}
        probe = self

        class _CB(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                if not probe.grads:
                    probe.grads = {n: None if p.grad is None else p.grad.detach().clone()
                                   for n, p in model.named_parameters() if any(s in n for s in probe.parts)}
        self.callback = _CB()

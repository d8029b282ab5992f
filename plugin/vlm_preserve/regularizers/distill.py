"""LinguDistill — distil language ability back from the frozen original LLM (LinguDistill,
arXiv 2604.00829; our reading in docs/distill.md).

The teacher is the LLM the VLM was built from: frozen, eval mode, no grad, never a submodule of the student
(so no optimizer state, never in a checkpoint or an export). It has no vision, so it sees the image through
the student: in every shared decoder layer its attention's keys and values at image positions are the
student's keys and values of the same layer (the outputs of `k_proj`/`v_proj`, before RoPE — both models
rotate by the same positions), and its own at text positions. Its input at image positions is zero, so
with sharing off (`distill_layers none`) it sees the text only.

    p_t = softmax(z_teacher / T),  p_s = softmax(z_student / T)      at response-text positions of routed samples
    L_distill = T² · mean_tokens KL(p_t ‖ p_s)                        (forward KL; direction, T, weight not reported)
    L = L_LM + distill_weight · L_distill

With the teacher's weights equal to the student's LLM and sharing on, the teacher's logits at text positions
equal the student's, so the KL and its gradient are 0 at initialisation (tests/test_distill.py).

Routing (selective distillation): a sample is distilled when the rule says it is language-intensive —
`auto`: no image in it, or at least `distill_min_response_tokens` supervised tokens (a long free-form
answer); `text_only`; `long_response`; `all` — unless its own override says otherwise: the batch key
`vlm_preserve_distill` ((B,) ints: 1 distil, 0 never, -1 follow the rule), which `llava-train` fills from the
data json field named by `distill_route_field`. Other samples keep the plain LM loss, and the teacher runs
only on the routed samples. Skipping it on a rank is safe: it is replicated and outside every DeepSpeed/DDP
engine, so its forward runs no collective, and the student's forwards and backward are the same either way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..capture import StepCapture
from ..config import IGNORE_INDEX, ConfigError, choice
from .base import Method, ModelDims, SetupContext, register

ROUTES = ("auto", "all", "text_only", "long_response")
ROUTE_KEY = "vlm_preserve_distill"  # per-sample override in the batch: 1 distil, 0 never, -1 follow the rule


@dataclass
class DistillConfig:
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term (not reported by the paper)."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T; the KL is scaled by T²."})
    distill_teacher: str = field(default="", metadata={
        "help": "The original LLM (path or name). llava-train: defaults to --model_name_or_path, the LLM upstream "
                "initialises the VLM from."})
    distill_layers: str = field(default="all", metadata={
        "help": "Decoder layers (0-based, comma-separated) where the teacher uses the student's keys/values at image "
                "positions; 'all', or 'none' (the teacher sees the text only)."})
    distill_kv_grad: bool = field(default=False, metadata={
        "help": "Let the distillation gradient reach the student through its shared keys/values (default: detached)."})
    distill_route: str = field(default="auto", metadata={
        "help": "Which samples are distilled: auto (text-only or long answers), all, text_only, long_response."})
    distill_min_response_tokens: int = field(default=32, metadata={
        "help": "A sample with at least this many supervised tokens counts as a long free-form answer."})
    distill_route_field: str = field(default="distill", metadata={
        "help": "Data json field (true/false) overriding the rule for one sample (llava-train)."})

    def validate(self) -> None:
        choice("--distill_route", self.distill_route, ROUTES)
        if self.distill_temperature <= 0:
            raise ConfigError(f"--distill_temperature {self.distill_temperature} must be > 0.")
        if self.distill_min_response_tokens < 0:
            raise ConfigError(f"--distill_min_response_tokens {self.distill_min_response_tokens} must be >= 0.")
        self.layer_indices(None)

    def layer_indices(self, num_layers: int | None) -> list[int] | None:
        """The shared layers (None = all); range-checked when the layer count is known."""
        spec = self.distill_layers.strip()
        if spec == "all":
            return None if num_layers is None else list(range(num_layers))
        if spec == "none":
            return []
        try:
            idx = sorted({int(s) for s in spec.split(",") if s.strip()})
        except ValueError:
            raise ConfigError(f"--distill_layers {spec!r}: expected 'all', 'none' or 0-based layer indices like 0,1,2.")
        if num_layers is not None and any(not 0 <= i < num_layers for i in idx):
            raise ConfigError(f"--distill_layers {spec!r} is out of range for a {num_layers}-layer LLM "
                              f"(use 0..{num_layers - 1}, 'all' or 'none').")
        return idx


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over rows of KL(softmax(t/T) ‖ softmax(s/T)), in fp32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def route_samples(cap: StepCapture, cfg: DistillConfig) -> torch.Tensor:
    """(B,) bool: which samples are distilled (rule, then per-sample override)."""
    long = (cap.labels != IGNORE_INDEX).sum(1) >= cfg.distill_min_response_tokens
    text_only = ~cap.image_mask.any(1)
    rule = {"all": torch.ones_like(long), "text_only": text_only, "long_response": long,
            "auto": text_only | long}[cfg.distill_route]
    override = cap.extra.get("route")
    if override is not None:
        override = torch.as_tensor(override, device=rule.device).view(-1)
        rule = torch.where(override >= 0, override > 0, rule)
    return rule


def kv_projections(layer: torch.nn.Module, where: str) -> tuple:
    """(k_proj, v_proj) of a decoder layer: Llama, Mistral, Qwen2, Phi (and their PEFT-wrapped forms)."""
    attn = getattr(layer, "self_attn", None)
    k, v = getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)
    if k is None or v is None:
        raise ConfigError(f"distill: the {where}'s decoder layer {type(layer).__name__} has no self_attn.k_proj / "
                          "self_attn.v_proj (supported: Llama, Mistral, Qwen2, Phi attention).")
    return k, v


def record_student_kv(layers, indices: list[int], current_capture, keep_grad: bool) -> list:
    """Forward hooks storing each shared layer's key/value projections in the capture (`extra["kv"][i] =
    [k, v]`: the rows at image positions, or with `keep_grad` the whole (B, L, d) outputs); only the first call per forward counts (reentrant checkpointing
    recomputes layers in backward). Returns the hook handles."""
    handles = []
    for i in indices:
        for j, mod in enumerate(kv_projections(layers[i], "student")):
            def hook(module, args, output, i=i, j=j):
                cap = current_capture()
                if cap is None or cap.image_mask is None:
                    return
                kv = cap.extra.setdefault("kv", {}).setdefault(i, [None, None])
                if kv[j] is None:
                    # no autograd op here: under non-reentrant checkpointing the recompute must save what the
                    # forward saved, so a kept-gradient output is indexed later, outside the layer
                    kv[j] = output if keep_grad else output.detach()[cap.image_mask]
            handles.append(mod.register_forward_hook(hook))
    return handles


@register
class Distill(Method):
    name = "distill"
    config_class = DistillConfig

    def __init__(self, cfg: DistillConfig, dims: ModelDims):
        super().__init__(cfg, dims)
        self.weight = cfg.distill_weight
        self.shared = cfg.layer_indices(dims.num_layers)
        self.teacher = None
        self._inject = None  # {layer: (image_mask, [k_rows, v_rows])} while the teacher runs

    # -- the teacher -------------------------------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        """Adopt the teacher (`attach(teacher=...)`, else loaded from --distill_teacher in the LLM's training dtype)
        and record the student's keys/values of the shared layers during its forward."""
        ctx.adapter.check_distill(ctx.model)
        layers = ctx.adapter.decoder_layers(ctx.model)
        teacher = ctx.teacher
        if teacher is None:
            dtype = next(ctx.adapter.llm_modules(ctx.model)[0].parameters()).dtype
            teacher = load_teacher(self.cfg.distill_teacher, dtype)
        for h in self.set_teacher(teacher, layers) + record_student_kv(layers, self.shared, ctx.current_capture,
                                                                        self.cfg.distill_kv_grad):
            ctx.patches.add_hook(h)

    def set_teacher(self, teacher: torch.nn.Module, student_layers) -> list:
        """Adopt a loaded teacher: frozen, eval, checked against the student's layers, K/V sharing hooks installed
        (their handles returned)."""
        teacher.eval().requires_grad_(False)
        handles = []
        layers = teacher.base_model.layers
        if len(layers) != len(student_layers):
            raise ConfigError(f"distill: the teacher has {len(layers)} decoder layers, the student's LLM "
                              f"{len(student_layers)}; --distill_teacher must be the LLM the VLM was built from.")
        for i in self.shared:
            pairs = zip(kv_projections(layers[i], "teacher"), kv_projections(student_layers[i], "student"))
            for j, (t, s) in enumerate(pairs):
                if t.out_features != _out_features(s):
                    raise ConfigError(f"distill: layer {i} key/value width differs (teacher {t.out_features}, student "
                                      f"{_out_features(s)}); --distill_teacher must match the student's LLM.")
                handles.append(t.register_forward_hook(self._share_hook(i, j)))
        self.teacher = teacher
        return handles

    def _share_hook(self, i: int, j: int):
        """Replace the teacher's keys (j=0) or values (j=1) of layer i at image positions by the student's."""
        def hook(module, args, output):
            inject = self._inject.get(i) if self._inject is not None else None
            if inject is None:
                return None
            mask, kv = inject
            return output.masked_scatter(mask[..., None], kv[j].to(output.dtype))
        return hook

    def teacher_logits(self, cap: StepCapture, positions: torch.Tensor) -> torch.Tensor:
        """Teacher logits (N, V) at `positions` (B, L) bool, seeing the image through the student's keys/values.

        The teacher runs only on the samples that have a position, up to the last one (causal attention: later
        tokens cannot change earlier logits)."""
        if cap.input_ids is None:
            raise RuntimeError("vlm-preserve: distill needs the token ids at text positions; this adapter's capture has "
                               "none (GenericAdapter: use image_token_id, so input_ids align with the decoder input).")
        t = self.teacher
        device = cap.inputs_embeds.device
        if next(t.parameters()).device != device:
            t.to(device)
        positions = positions.to(device)
        rows = positions.any(1)
        length = int(positions.any(0).nonzero().max()) + 1
        keep = torch.zeros_like(positions)
        keep[rows, :length] = True
        kv = cap.extra.get("kv", {})
        missing = [i for i in self.shared if i not in kv or None in kv[i]]
        if missing and bool(cap.image_mask.any()):
            raise RuntimeError(f"vlm-preserve: the student's forward recorded no keys/values for layers {missing}.")
        image = cap.image_mask[rows, :length]
        kept = keep[cap.image_mask]  # which of the recorded image rows belong to the kept block

        def rows_of(r):
            return r[rows, :length][image] if r.dim() == 3 else r[kept]
        self._inject = {i: (image, [rows_of(r) for r in kv[i]]) for i in self.shared if i in kv}
        embeds = t.get_input_embeddings()(cap.input_ids[rows, :length].clamp(min=0).to(device))
        embeds = embeds.masked_fill(image[..., None], 0.0)
        grad = self.cfg.distill_kv_grad and torch.is_grad_enabled()
        try:
            with (contextlib.nullcontext() if grad else torch.no_grad()):
                out = t.base_model(inputs_embeds=embeds, attention_mask=cap.attention_mask[rows, :length].long(),
                                   use_cache=False)
                return t.get_output_embeddings()(out[0][positions[rows, :length]])
        finally:
            self._inject = None

    # -- the term ----------------------------------------------------------------------------------------
    def positions(self, cap: StepCapture) -> torch.Tensor:
        """(B, L) bool: text positions whose next token is supervised, in routed samples. (The last image
        position predicts the first token after the image, but the teacher's query there is blind.)"""
        sel = torch.zeros_like(cap.attention_mask)
        sel[:, :-1] = cap.labels[:, 1:].to(sel.device) != IGNORE_INDEX
        return sel & cap.attention_mask & ~cap.image_mask & route_samples(cap, self.cfg)[:, None]

    def loss(self, cap: StepCapture) -> tuple[torch.Tensor, bool]:
        if cap.labels is None or cap.logits is None:
            raise RuntimeError("vlm-preserve: distill needs the batch's labels and the student's logits; this loss path "
                               "has none (a compute_loss_func pops the labels; a fused LM head builds no logits).")
        if self.teacher is None:
            raise RuntimeError("vlm-preserve: distill has no teacher (Attachment loads it from --distill_teacher).")
        if self.cfg.distill_kv_grad and any(r is not None and not r.requires_grad
                                            for kv in cap.extra.get("kv", {}).values() for r in kv):
            raise RuntimeError("vlm-preserve: --distill_kv_grad True, but the student's keys/values carry no gradient "
                               "(reentrant gradient checkpointing runs the forward without autograd); use "
                               "gradient_checkpointing_kwargs={'use_reentrant': False} or leave distill_kv_grad off.")
        sel = self.positions(cap)
        if not bool(sel.any()):  # the teacher is outside every engine and runs no collective: skipping is safe
            return cap.logits.sum() * 0.0, False
        student = cap.logits[sel.to(cap.logits.device)]
        return kl_loss(student, self.teacher_logits(cap, sel).to(student.device), self.cfg.distill_temperature), True


def _out_features(module) -> int:
    if hasattr(module, "out_features"):
        return module.out_features
    return module.base_layer.out_features  # PEFT LoRA wrapper


@contextlib.contextmanager
def _zero3_off():
    """Load the teacher whole on every rank even under DeepSpeed ZeRO-3: from_pretrained would otherwise
    partition it, and a partitioned model outside any engine has empty weights (docs/distill.md: why replicated)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def load_teacher(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """The original LLM as a frozen CausalLM in the training dtype."""
    if not path:
        raise ConfigError("--regularizer distill needs --distill_teacher PATH: the original LLM the VLM was built from.")
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--distill_teacher {path!r} cannot be loaded as a model config ({e}); "
                          "give the folder or hub name of the original LLM.") from None
    if getattr(config, "mm_vision_tower", None) or getattr(config, "vision_config", None):
        raise ConfigError(f"--distill_teacher {path!r} is a vision-language checkpoint; the teacher is the original "
                          "language model the VLM was built from (pass its path with --distill_teacher).")
    from ..compat import dtype_kwarg
    with _zero3_off():
        teacher = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(dtype))
    return teacher.eval().requires_grad_(False)

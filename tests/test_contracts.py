"""The extension contracts (docs/architecture.md): a method registered from outside the package is a flag, a
`--regularizer` name and a logged term with no other change; adapters share one capture rule; the 0.1 keyword
form of attach() still works, with a deprecation warning."""
import dataclasses
import warnings
from dataclasses import dataclass, field

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("needs transformers >= 4.52 (the transformers-native environment)", allow_module_level=True)

from helpers.native_models import build, make_batch  # noqa: E402
from vlm_preserve import ConfigError, PReConfig, RDDConfig, attach  # noqa: E402
from vlm_preserve.capture import CaptureSession, StepCapture  # noqa: E402
from vlm_preserve.regularizers import REGISTRY, Method, config_classes, register  # noqa: E402


@dataclass
class NormConfig:
    norm_weight: float = field(default=0.25, metadata={"help": "Weight of the test-only norm term."})

    def validate(self) -> None:
        if self.norm_weight < 0:
            raise ConfigError("--norm_weight must be >= 0")


class VisualNorm(Method):
    """A test-only term: the mean squared norm of the visual tokens entering the LLM."""
    name = "visual_norm"
    config_class = NormConfig

    def __init__(self, cfg, dims):
        super().__init__(cfg, dims)
        self.weight = cfg.norm_weight

    def loss(self, cap: StepCapture):
        v = cap.visual_embeds().float()
        return (v.pow(2).sum(-1).mean() if v.shape[0] else v.sum() * 0), v.shape[0] > 0


@pytest.fixture
def registered():
    register(VisualNorm)
    yield VisualNorm
    REGISTRY.pop(VisualNorm.name)


def test_a_method_registered_from_outside_is_a_flag_a_name_and_a_logged_term(registered):
    # the checklist of docs/architecture.md, followed: (1) a config dataclass, (2) a Method subclass, (3) register
    assert NormConfig in config_classes()
    from vlm_preserve.cli import llava_train
    parser = llava_train._parser()
    args = parser.parse_args_into_dataclasses(["--regularizer", "rdd,visual_norm", "--norm_weight", "0.5"],
                                              return_remaining_strings=True)
    assert any(isinstance(a, NormConfig) and a.norm_weight == 0.5 for a in args)
    assert "visual_norm" in parser.format_help()

    model = build("llava")
    batch = make_batch(model, "llava")
    att = attach(model, "rdd,visual_norm", NormConfig(norm_weight=0.5))
    out = model(**batch, **att.forward_kwargs())
    cap_visual = att.session.capture.visual_embeds().detach().float()
    total, logs = att.total_loss(out.loss, out)
    want = cap_visual.pow(2).sum(-1).mean()
    assert logs["visual_norm_loss"] is not None
    torch.testing.assert_close(logs["visual_norm_loss"], want)
    torch.testing.assert_close(total.detach(), out.loss.detach() + logs["rdd_loss"] + 0.5 * want)
    att.detach()


def test_register_refuses_a_taken_name_and_a_taken_flag(registered):
    class Again(Method):
        name = "visual_norm"
    with pytest.raises(ValueError, match="taken"):
        register(Again)

    @dataclass
    class Clash:
        rdd_weight: float = 1.0

    class Other(Method):
        name = "other"
        config_class = Clash
    with pytest.raises(ValueError, match="rdd_weight"):
        register(Other)
    with pytest.raises(TypeError, match="not a subclass"):
        register(object)


def test_options_of_a_method_that_is_off_are_refused(registered):
    model = build("llava")
    with pytest.raises(ConfigError, match="--norm_weight was given but 'visual_norm' is not enabled"):
        attach(model, "rdd", NormConfig(norm_weight=0.5))


def test_configs_are_passed_by_type_in_any_order_and_the_keyword_form_is_deprecated():
    model = build("llava")
    att = attach(model, "rdd,pre", PReConfig(pre_layer="1"), RDDConfig(rdd_weight=0.5))
    rdd, pre = att.preserver.terms
    assert (rdd.weight, pre.layer) == (0.5, 1)
    att.detach()
    with pytest.warns(DeprecationWarning, match="positionally"):
        att = attach(model, "rdd,pre", rdd=RDDConfig(rdd_weight=0.5), pre=PReConfig(pre_layer="1"))
    rdd, pre = att.preserver.terms
    assert (rdd.weight, pre.layer) == (0.5, 1)
    att.detach()
    with pytest.warns(DeprecationWarning, match="defaults to 'rdd'"):
        att = attach(model)
    assert att.preserver.names == ["rdd"]
    att.detach()
    with pytest.raises(TypeError, match="not a config of a registered method"):
        attach(model, "rdd", object())
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        attach(model, "rdd", rdds=RDDConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current form warns about nothing
        attach(model, "rdd", RDDConfig()).detach()


def test_capture_session_keeps_the_first_forward_of_a_step_only():
    model = build("llava")
    att = attach(model, "rdd")
    first, second = make_batch(model, "llava", seed=1), make_batch(model, "llava", seed=2)
    out = model(**first)
    cap = att.session.capture
    assert cap is not None and cap.logits is not None
    logits = cap.logits
    model(**second)  # a later forward of the same step (a metrics pass): neither replaces nor adds
    assert att.session.capture is cap and cap.logits is logits
    torch.testing.assert_close(cap.logits, out.logits)
    att.total_loss(out.loss, out)  # takes the capture
    att.begin_step()
    model(**second)
    cap2 = att.session.capture
    assert cap2 is not cap and torch.equal(cap2.input_ids, second["input_ids"].masked_fill(cap2.image_mask, -1))
    att.detach()


def test_capture_session_rule():
    s = CaptureSession()
    assert s.begin_forward() and s.capturing
    cap = s.record(StepCapture())
    assert not s.capturing and s.capture is cap
    assert not s.begin_forward() and not s.capturing  # a second forward of the step
    assert s.take() is cap and s.capture is None
    assert not s.capturing  # a recompute after the loss took the capture is still not captured
    s.begin_step()
    assert s.begin_forward()


def test_attach_refuses_an_adapter_that_is_not_one():
    from vlm_preserve.adapters import transformers_native
    model = build("llava")
    with pytest.raises(TypeError, match="not a vlm_preserve Adapter"):
        attach(model, "rdd", adapter=transformers_native)


def test_every_method_declares_its_needs():
    for name, cls in REGISTRY.items():
        assert cls.name == name
        assert cls.config_class is None or dataclasses.is_dataclass(cls.config_class)
        assert cls.has_loss or cls.setup is not Method.setup, name  # a method does something


def test_nothing_outside_cli_imports_the_cli_and_every_framework_lives_in_frameworks():
    """cli/ parses flags and launches; the hooking into each framework is in frameworks/ (docs/architecture.md)."""
    import ast
    from pathlib import Path

    import vlm_preserve
    root = Path(vlm_preserve.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "cli":
            continue
        package = ["vlm_preserve", *rel.parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                names = [".".join(base + ([node.module] if node.module else []))]
                names += [f"{names[0]}.{a.name}" for a in node.names]
            offenders += [f"{rel}: {n}" for n in names if n == "vlm_preserve.cli" or n.startswith("vlm_preserve.cli.")]
    assert not offenders, offenders
    frameworks = {p.stem for p in (root / "frameworks").glob("*.py")} - {"__init__"}
    assert {"llava", "bunny", "nvila", "llamafactory", "swift", "upstream"} <= frameworks
    assert (root / "frameworks" / "swift_plugin" / "vlm_preserve_swift.py").is_file()


def test_every_import_inside_the_package_names_something_that_exists():
    """Imports done lazily inside functions (for upstreams installed only in their own environment) run only in
    that environment's tests; a moved name must fail here, in every environment, not only there."""
    import ast
    import importlib
    from pathlib import Path

    import vlm_preserve
    root = Path(vlm_preserve.__file__).parent

    def top_level_names(path: Path) -> set[str]:
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.If, ast.Try)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                        names.add(sub.name)
                    elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                        names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
                    elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        names.add(sub.id)
        return names

    def lazy(module: Path, name: str) -> bool:  # a module-level __getattr__ (the package's lazy names)
        if "__getattr__" not in top_level_names(module):
            return False
        parts = module.relative_to(root.parent).with_suffix("").parts
        return hasattr(importlib.import_module(".".join(p for p in parts if p != "__init__")), name)

    missing, checked = [], 0
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*(node.module or "").split(".")) if node.module else base
            for alias in node.names:
                checked += 1
                if (target / alias.name).is_dir() or target.with_name(target.name).joinpath(f"{alias.name}.py").is_file():
                    continue  # a submodule
                module = target / "__init__.py" if target.is_dir() else target.with_suffix(".py")
                if not module.is_file():
                    missing.append(f"{rel}:{node.lineno}: no module {module.relative_to(root)}")
                elif alias.name != "*" and alias.name not in top_level_names(module) and not lazy(module, alias.name):
                    missing.append(f"{rel}:{node.lineno}: {alias.name} not in {module.relative_to(root)}")
    assert checked > 50
    assert not missing, missing

"""A rewrite changes the FFN and nothing else, or the conversion is refused: members the FFN shares with
other code stay, graph edits keep the module they edit, and a function-preserving conversion that computes
something else than the dense model is an error, not a report entry."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixcompile as mc
from mixcompile.compiler.rewrite import Assignment, apply
from mixcompile.compiler.verify import tensor_disagreement
from mixcompile.runtime.blocks import MoEBlock
from mixcompile.runtime.rewritten import EditedForward

D, H = 8, 16
UPCYCLE = {"strategy": "moe", "num_experts": 4, "top_k": 2, "init": "upcycle"}


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _upcycled(model: nn.Module, **options) -> tuple[nn.Module, torch.Tensor]:
    """The converted model (float64, eval) and the largest difference from the dense one on fresh input."""
    torch.manual_seed(0)
    model = model.double().eval()
    converted = mc.convert(model, **{**UPCYCLE, **options})
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-10)
    return converted, x


class SharedFunction(nn.Module):
    """``self.act = F.gelu`` serves the FFN and another branch: emptying the attribute for the FFN (chain
    collapse) removed the other branch's GELU (1.48 off an upcycled model, reported exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, H), nn.Linear(H, D)
        self.act = F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.act(self.proj(x))
        return x + self.fc2(self.act(self.fc1(x)))


def test_a_function_attribute_used_outside_the_ffn_is_kept() -> None:
    converted, _ = _upcycled(Wrap(SharedFunction()))
    assert converted.layer.act is F.gelu


class UntracedForward(nn.Module):
    """The FFN sits in a helper because forward does not trace (data-dependent control flow); each
    subclass's forward also uses one of the FFN's members (``share``), as a value no graph shows."""

    share = ""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, H), nn.Linear(H, D)
        self.act, self.dropout = nn.GELU(), 0.5

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(x))
        if self.share == "dropout":
            hidden = F.dropout(hidden, p=self.dropout, training=self.training)
        return self.fc2(hidden)


class SharesActivation(UntracedForward):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.act(self.attn(x))
        if x.abs().max() > 1e4:  # data-dependent: this forward does not trace
            x = x.clamp(-1e4, 1e4)
        return x + self._ff(x)


class SharesDropout(UntracedForward):
    share = "dropout"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.attn(x), p=self.dropout, training=self.training)
        if x.abs().max() > 1e4:
            x = x.clamp(-1e4, 1e4)
        return x + self._ff(x)


class ReadsWeight(UntracedForward):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x).to(self.fc2.weight.dtype)
        if x.abs().max() > 1e4:
            x = x.clamp(-1e4, 1e4)
        return x + self._ff(x)


@pytest.mark.parametrize(
    ("layer", "named"),
    [(SharesActivation, "self.act"), (SharesDropout, "self.dropout"), (ReadsWeight, "self.fc2")],
)
def test_members_an_untraced_forward_also_uses_are_not_emptied(layer, named) -> None:
    """Chain collapse counted the other uses of the FFN's members only in traced graphs: with forward
    untraced it emptied the activation forward also used (1.48 off, eval) or zeroed the dropout forward
    also reads (no attention dropout in training)."""
    model = Wrap(layer())
    (site,) = mc.inspect(model, **UPCYCLE).sites
    assert site.status == "cannot rewrite" and named in site.reason and "does not trace" in site.reason
    with pytest.raises(mc.ConfigError, match="can be rewritten"):
        mc.convert(model, **UPCYCLE)


class Layer(nn.Module):
    """An inline FFN (a graph edit) in a module with more than its forward reads: a parameter and a
    buffer of its own, a plain attribute its parent reads, and a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.extra = nn.Linear(D, D)
        self.register_buffer("num_updates", torch.zeros(()))
        self.layer_scale = 0.5

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x))) * scale


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) * layer.layer_scale
        return x


def test_a_graph_edit_keeps_the_module_it_edits() -> None:
    """The edited module used to become a GraphModule of what its forward read: its class, its other
    parameters and buffers (gone from the state dict), its attributes (the parent's next forward failed)
    and its hooks were lost."""
    model = Stack().double()
    calls = Calls()
    model.layers[0].register_forward_hook(calls)
    converted, x = _upcycled(model)
    calls = converted.layers[0]._forward_hooks[next(iter(converted.layers[0]._forward_hooks))]
    layer = converted.layers[0]
    assert type(layer) is Layer and isinstance(layer.forward, EditedForward)
    assert isinstance(layer.fc1, MoEBlock) and layer.fc2 is None  # the FFN's modules are the block's now
    dense_keys = {k for k in model.state_dict() if ".fc" not in k}
    assert dense_keys <= set(converted.state_dict())  # extra.*, num_updates kept
    calls.count = 0
    with torch.no_grad():
        converted(x)
        assert calls.count == 1 and layer(x, scale=2.0).shape == x.shape  # the forward's own arguments
    for copied in (copy.deepcopy(converted), _pickled(converted)):
        assert copied.layers[0].forward.owner is copied.layers[0]
        with torch.no_grad():
            torch.testing.assert_close(copied(x), converted(x), rtol=0, atol=0)


class Calls:
    """A forward hook that counts (a class, so the model pickles)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *_: object) -> None:
        self.count += 1


def _pickled(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_graph_edited_model_saves_and_loads(tmp_path) -> None:
    converted, x = _upcycled(Stack().double())
    mc.save(converted, tmp_path / "m")
    loaded = mc.load(tmp_path / "m", base=lambda: Stack().double()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)


class OtherMethod(nn.Module):
    """The FFN's activation is also used by a method the parent calls: no graph shows that use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), nn.Tanh(), nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


class UsesOtherMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D, D), OtherMethod())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp[1].squash(self.mlp(x)) * 3


def test_a_function_preserving_conversion_that_changes_the_model_is_refused() -> None:
    """Per-site checks compare each block with the FFN read from the model, so a rewrite that also
    changed what other code computes passed them; the whole model's output is now held to the same
    standard, and the model is left as it was."""
    torch.manual_seed(0)
    model = UsesOtherMethod().double().eval()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    before = model(x)
    with pytest.raises(mc.VerificationError, match=r"changed more than its FFNs: .* differs by .*Sites: 0"):
        mc.convert(model, **UPCYCLE, example_inputs=(x,), inplace=True)
    assert isinstance(model.mlp[1].act, nn.Tanh)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    unchecked = mc.convert(model, **UPCYCLE, example_inputs=(x,), verify=False)
    assert not torch.allclose(unchecked(x), before)  # what verify=False lets through, knowingly


class Noisy(nn.Module):
    """Random in eval mode: no conversion can match its last output, so nothing is compared."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + torch.randn_like(x)


def test_a_model_random_in_eval_is_converted_with_a_note() -> None:
    x = torch.randn(2, 5, D)
    converted, report = mc.convert_with_report(Noisy(), **UPCYCLE, example_inputs=(x,))
    assert isinstance(converted.mlp, MoEBlock) and report.model_max_error is None
    assert any("differs between two eval forwards" in note for note in report.notes)


def test_apply_is_all_or_nothing() -> None:
    model = nn.Sequential(nn.Linear(D, D), nn.Linear(D, D))
    first, second = model[0], model[1]
    changes = [Assignment("", "0", nn.Identity()), Assignment("missing", "x", nn.Identity())]
    with pytest.raises(AttributeError):
        apply(model, changes)
    assert model[0] is first and model[1] is second


class OptionalMask(nn.Module):
    """An inline FFN in a forward that branches on whether an optional argument is given."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask.unsqueeze(-1)
        return x + self.fc2(F.gelu(self.fc1(x)))


class GradMode(nn.Module):
    """An inline FFN beside a branch computed without gradients (a frozen teacher)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.teacher = nn.Linear(D, H), nn.Linear(H, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(x)
        return x + self.fc2(F.gelu(self.fc1(x))) + target


class Frozen(nn.Module):
    """A layer frozen by a decorator on its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (
            OptionalMask,
            "branches on whether 'mask' is given",
        ),  # the edit kept the mask branch: mask=None failed
        (GradMode, "uses no_grad, which a traced graph does not record"),  # the teacher got gradients
        (Frozen, "uses a grad-mode decorator"),  # the edited forward dropped @torch.no_grad(): it trained
    ],
)
def test_what_a_traced_graph_cannot_hold_is_not_graph_edited(layer, reason) -> None:
    (site,) = mc.inspect(Wrap(layer()), **UPCYCLE).sites
    assert site.status == "cannot rewrite" and reason in site.reason


class KeywordMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class CallsByKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = KeywordMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(hidden_states=x)


def test_a_block_takes_its_input_by_the_name_the_ffn_gave_it() -> None:
    """The parent calls ``self.mlp(hidden_states=h)``; the swapped-in block only took ``x``."""
    converted, _ = _upcycled(CallsByKeyword())
    assert isinstance(converted.mlp, MoEBlock)


class SharedMLP(nn.Module):
    """One MLP object registered in two layers (ALBERT-style sharing)."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))
        self.first, self.second = nn.ModuleDict({"mlp": shared}), nn.ModuleDict({"mlp": shared})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second["mlp"](x + self.first["mlp"](x))


def test_a_shared_ffn_module_is_replaced_everywhere_it_is_registered() -> None:
    """Only its first registration was replaced: one layer ran the experts, the other the dense copy."""
    converted, _ = _upcycled(SharedMLP())
    assert isinstance(converted.first["mlp"], MoEBlock) and converted.first["mlp"] is converted.second["mlp"]
    (site,) = mc.inspect(SharedMLP(), **UPCYCLE).sites
    assert "(shared: also second.mlp)" in site.rewrite


def test_the_rounding_check_skips_what_the_dense_model_overflows_and_catches_new_nan() -> None:
    """T5 in float16 overflows in its own FFN: a NaN there is the dense model's, not the block's; a NaN
    where the dense output is finite is a difference (max() over it would pass silently)."""
    nan = float("nan")
    assert tensor_disagreement(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.0])) is None
    assert tensor_disagreement(torch.tensor([1.0, 2.0]), torch.tensor([nan, 2.0])) is not None
    assert tensor_disagreement(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0005])) is None
    assert tensor_disagreement(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.01])) is not None


def test_a_model_that_cannot_be_copied_says_to_convert_in_place() -> None:
    """Old-style weight_norm makes deepcopy raise torch's own RuntimeError from inside convert."""
    model = nn.Sequential(nn.Linear(D, D), nn.utils.weight_norm(nn.Linear(D, D)))
    with pytest.raises(mc.MixcompileError, match=r"cannot be copied for conversion .*pass inplace=True"):
        mc.convert(model, **UPCYCLE)


def test_hooks_on_the_ffn_module_keep_running() -> None:
    """A module swap put a block where the hooked MLP was: its hooks (activation capture, say) stopped
    running, silently. The MLP now stays, its children rewritten (chain collapse)."""
    model = Wrap(KeywordMLP())
    calls = Calls()
    model.layer.register_forward_hook(calls)
    converted, x = _upcycled(model)
    assert type(converted.layer) is KeywordMLP and isinstance(converted.layer.fc1, MoEBlock)
    (calls,) = converted.layer._forward_hooks.values()  # the converted copy's
    calls.count = 0
    with torch.no_grad():
        converted(x)
    assert calls.count == 1


class TwoInline(nn.Module):
    """Two inline FFNs in one forward: a graph edit per conversion."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2, self.b1, self.b2 = (
            nn.Linear(D, H),
            nn.Linear(H, D),
            nn.Linear(D, H),
            nn.Linear(H, D),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.a2(F.gelu(self.a1(x)))
        return x + self.b2(F.relu(self.b1(x)))


def test_a_graph_edited_module_is_converted_again_and_compiled_from_a_copy() -> None:
    """A second convert traced the class's forward, which reads the emptied FFN members (no FFN found);
    a copy's edited forward made its code on first call, which torch.compile(fullgraph=True) cannot trace."""
    converted, x = _upcycled(Wrap(TwoInline()), sites=[0])
    again, _ = _upcycled(converted)
    assert isinstance(again.layer.a1, MoEBlock) and isinstance(again.layer.b1, MoEBlock)
    copied = copy.deepcopy(again)
    compiled = torch.compile(copied, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), again(x), rtol=0, atol=0)


def test_a_verification_failure_with_a_graph_edit_raises_verification_error() -> None:
    """The model was restored twice (once to re-run the dense model, once on the way out): undoing a graph
    edit's new attributes a second time raised AttributeError instead."""
    torch.manual_seed(0)
    model = nn.Sequential(UsesOtherMethod(), Wrap(TwoInline())).double().eval()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    before = model(x)
    with pytest.raises(mc.VerificationError):
        mc.convert(model, **UPCYCLE, example_inputs=(x,), inplace=True)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_to_token_choice_keeps_the_keyword_hook_and_the_sharing() -> None:
    """The Token Choice block replaced the MoT block at its first path only, without its keyword hook."""
    torch.manual_seed(0)
    mot = {"strategy": "mot", "num_experts": 4, "group_size": 2, "init": "random", "layout": "batch_first"}
    for model in (mc.convert(CallsByKeyword(), **mot), mc.convert(SharedMLP(), **mot)):
        mc.to_token_choice(model)
        assert not any(isinstance(m, mc.MoTBlock) for m in model.modules())
        model(torch.randn(2, 5, D))
    assert model.first["mlp"] is model.second["mlp"]

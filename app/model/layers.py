"""Choose which transformer layers run in a forward pass, without changing the model's parameters.

Layer dropping (PLD), random-path training (RaPTr) and layer stacking all act through
:class:`LayerAdapter`. Outside a forward pass the model always holds its full ``nn.ModuleList``, so
parameter names, ``state_dict()`` keys and the optimizer see the whole model. While the stack's owner
(``BertEncoder`` / ``T5Stack``) runs, a forward pre-hook swaps in a ``ModuleList`` of the active layers,
and a forward hook registered with ``always_call=True`` puts the full list back, also when the forward
raises. An inactive layer is never called: its input passes through unchanged and its parameters get no
gradient (``.grad`` stays ``None``, so PyTorch optimizers skip them).

Checked against transformers 5.23:

* ``BertEncoder`` (RoBERTa-PreLN copies it) loops ``for i, layer_module in enumerate(self.layer)`` and
  ``T5Stack`` loops ``for layer_module in self.block``; neither reads ``num_hidden_layers`` /
  ``num_layers`` there. Layers keep their original ``layer_idx``, used only to index a KV cache (T5
  ``generate`` on a subset still matches the pruned model). Hidden states are recorded by hooks on the
  layers, so ``output_hidden_states`` returns ``active + 1`` tensors.
* ``ModernBertModel`` (5.24) keeps its layers in ``.layers`` and loops ``for encoder_layer in
  self.layers``; the rotary embeddings and the attention masks are built once, before the loop, per
  attention type, and each layer picks its own by its ``attention_type``, so any subset runs. Layer 0
  has no attention LayerNorm (``attn_norm`` is an Identity: the embeddings end in a norm), so
  :meth:`LayerAdapter.copy_layer` from or to layer 0 leaves the other layer's ``attn_norm`` as it is.
* T5 computes the relative position bias only in block 0 and hands it on; without block 0 the later
  blocks build an all-zero bias and silently lose all position information. T5 sets must keep block 0.
* A new active set changes the module tree, so ``torch.compile`` recompiles. Change the set only between
  steps: an activation-checkpoint recompute must see the set its forward saw.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    BertPreTrainedModel,
    ModernBertPreTrainedModel,
    PreTrainedModel,
    RobertaPreLayerNormPreTrainedModel,
    T5PreTrainedModel,
)

from app.errors import ConfigurationError

_SUPPORTED = (
    "BERT (Bert*), RoBERTa-PreLayerNorm (RobertaPreLayerNorm*), ModernBERT (ModernBert*), T5 (T5Model, "
    "T5ForConditionalGeneration, T5EncoderModel), or any model whose base model has an `.encoder.layer` "
    "nn.ModuleList"
)


@dataclass(frozen=True)
class FamilyTraits:
    """What the depth methods must know about a model family, answered here so they never test names.

    Attributes:
        always_active: layer indices every active set must keep. T5 computes the relative position
            bias only in block 0 and hands it on; without block 0 the later blocks build an all-zero
            bias and silently lose all position information.
        exact_residual_scaling: whether ``x + s * (f(x) - x)`` scales exactly the layer's residual
            branches (Pre-LN: ``f(x) - x`` is attention + feed-forward). A Post-LN layer ends in a
            LayerNorm, so ``f(x) - x`` is no residual branch there.
    """

    always_active: tuple[int, ...] = ()
    exact_residual_scaling: bool = False


FAMILY_TRAITS: dict[str, FamilyTraits] = {
    "bert": FamilyTraits(),
    "roberta-prelayernorm": FamilyTraits(exact_residual_scaling=True),
    # h = x + attn(norm(x)); y = h + mlp(norm(h)): y - x is exactly the two residual branches.
    "modernbert": FamilyTraits(exact_residual_scaling=True),
    "t5": FamilyTraits(always_active=(0,), exact_residual_scaling=True),
    "encoder": FamilyTraits(),
}


def family_traits(family: str | None) -> FamilyTraits:
    """The traits of a family by name (an RST profile's ``model.family``); unknown names have none."""
    return FAMILY_TRAITS.get(family or "", FamilyTraits())


# Attribute on the stack's owner module that holds its _Stack, so that every LayerAdapter built on the
# same model shares one active set and one pair of hooks (two callbacks may each build an adapter).
_STATE_ATTR = "_ntng_layer_stack"


@dataclass
class _Stack:
    """The full layer list of one stack, its active set, and the hooks that apply the set."""

    attr: str  # "layer" (BERT-like), "layers" (ModernBERT) or "block" (T5)
    full: nn.ModuleList
    active: tuple[int, ...]
    subset: nn.ModuleList | None = None  # None while all layers are active: nothing to swap
    depth: int = 0  # forward calls of the owner in progress (re-entrant calls swap/restore once)
    scales: dict[int, float] = field(default_factory=dict)  # residual-branch scale per layer (1 if absent)
    scale_hooks: bool = False  # whether the per-layer scaling hooks are registered

    def swap_in(self, owner: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth == 1 and self.subset is not None:
            setattr(owner, self.attr, self.subset)

    def restore(self, owner: nn.Module, args: Any, output: Any) -> None:
        # The always-called hook also runs when an earlier pre-hook raised before swap_in ran.
        if self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            setattr(owner, self.attr, self.full)


def _scaled_output(scales: dict[int, float], index: int):
    """Forward hook scaling layer ``index``'s residual function: ``y' = x + s * (y - x)``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        scale = scales.get(index, 1.0)
        if scale == 1.0:
            return None
        inputs = args[0] if args else kwargs["hidden_states"]
        hidden = output[0] if isinstance(output, tuple) else output
        scaled = inputs + scale * (hidden - inputs)
        return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

    return hook


def _find_stacks(model: nn.Module) -> tuple[str, dict[str, tuple[nn.Module, str]]]:
    """Returns the family name and, per stack name, the owner module and its layer-list attribute."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    if isinstance(model, T5PreTrainedModel) and isinstance(getattr(encoder, "block", None), nn.ModuleList):
        owners = {"encoder": (encoder, "block")}
        decoder = getattr(base, "decoder", None)
        if isinstance(getattr(decoder, "block", None), nn.ModuleList):
            owners["decoder"] = (decoder, "block")
        return "t5", owners
    if isinstance(model, ModernBertPreTrainedModel) and isinstance(getattr(base, "layers", None), nn.ModuleList):
        return "modernbert", {"encoder": (base, "layers")}
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        if isinstance(model, BertPreTrainedModel):
            family = "bert"
        elif isinstance(model, RobertaPreLayerNormPreTrainedModel):
            family = "roberta-prelayernorm"
        else:
            family = "encoder"
        return family, {"encoder": (encoder, "layer")}
    raise ConfigurationError(f"LayerAdapter does not support {type(model).__name__}; supported: {_SUPPORTED}")


class LayerAdapter:
    """Selects the active layers of an HF BERT / RoBERTa-PreLN / T5 model and copies layers.

    Every adapter built on the same model shares the same active set. A new model starts with all layers
    active, and with all active the forward pass is bitwise identical to the unwrapped model.

    Attributes:
        family: ``"bert"``, ``"roberta-prelayernorm"``, ``"modernbert"``, ``"t5"`` or ``"encoder"`` (any other model
            with an ``.encoder.layer`` list).
        stack_names: ``("encoder",)`` or, for T5 encoder-decoder models, ``("encoder", "decoder")``.
        traits: the family's :class:`FamilyTraits` (layers that must always run, exact output scaling).
    """

    def __init__(self, model: nn.Module) -> None:
        """Attaches to ``model`` (idempotent: a second adapter on the same model shares the first's state).

        Args:
            model: An HF BERT, RoBERTa-PreLN or T5 model, or one with an ``.encoder.layer`` list.

        Raises:
            ConfigurationError: (a ``ValueError``) if the model is not of a supported family.
        """
        self.family, owners = _find_stacks(model)
        self.traits = family_traits(self.family)
        self.stack_names: tuple[str, ...] = tuple(owners)
        self._stacks: dict[str, _Stack] = {}
        for name, (owner, attr) in owners.items():
            state = getattr(owner, _STATE_ATTR, None)
            if state is None:
                full = getattr(owner, attr)
                state = _Stack(attr=attr, full=full, active=tuple(range(len(full))))
                # prepend: swap before any other pre-hook, so the always-called restore covers its errors.
                owner.register_forward_pre_hook(state.swap_in, prepend=True)
                owner.register_forward_hook(state.restore, always_call=True)
                setattr(owner, _STATE_ATTR, state)
            self._stacks[name] = state

    def _stack(self, stack: str) -> _Stack:
        if stack not in self._stacks:
            raise ValueError(f"unknown stack {stack!r}; this model has {list(self.stack_names)}")
        return self._stacks[stack]

    def _selected(self, stack: str | None) -> tuple[str, ...]:
        if stack is None:
            return self.stack_names
        self._stack(stack)  # raises on an unknown name
        return (stack,)

    def layers(self, stack: str = "encoder") -> nn.ModuleList:
        """Returns the full layer list of a stack, active or not (also during a forward pass).

        Args:
            stack: ``"encoder"`` or ``"decoder"``.

        Returns:
            The model's own ``nn.ModuleList`` (not a copy).
        """
        return self._stack(stack).full

    def num_layers(self, stack: str = "encoder") -> int:
        """Returns the full depth of a stack.

        Args:
            stack: ``"encoder"`` or ``"decoder"``.

        Returns:
            The number of layers the model was built with.
        """
        return len(self._stack(stack).full)

    def active_layers(self, stack: str = "encoder") -> list[int]:
        """Returns the indices of the layers that run in a forward pass.

        Args:
            stack: ``"encoder"`` or ``"decoder"``.

        Returns:
            Sorted layer indices.
        """
        return list(self._stack(stack).active)

    def active_depth(self) -> dict[str, int]:
        """Returns the number of active layers per stack, e.g. ``{"encoder": 4, "decoder": 4}``."""
        return {name: len(state.active) for name, state in self._stacks.items()}

    def all_active(self) -> bool:
        """Returns whether every layer of every stack is active."""
        return all(state.subset is None for state in self._stacks.values())

    def _check_index(self, value: Any, stack: str, what: str) -> int:
        # operator.index accepts Python and numpy integers and integer 0-d tensors; bools are refused
        # because True/False as layer indices are almost certainly a bug (e.g. a keep-mask passed by mistake).
        if isinstance(value, bool):
            raise ValueError(f"{what} must be an int, got bool {value!r}")
        try:
            index = operator.index(value)
        except TypeError:
            raise ValueError(f"{what} must be an int, got {type(value).__name__} {value!r}") from None
        n = self.num_layers(stack)
        if not 0 <= index < n:
            raise ValueError(f"{what} {index} is out of range for the {n}-layer {stack} stack (0..{n - 1})")
        return index

    def _validated(self, indices: Sequence[int], stack: str) -> tuple[int, ...]:
        checked = [self._check_index(i, stack, "layer index") for i in indices]
        if not checked:
            raise ValueError(f"the active set of the {stack} stack must not be empty")
        if len(set(checked)) != len(checked):
            raise ValueError(f"duplicate layer indices in {list(checked)} for the {stack} stack")
        if missing := [i for i in self.traits.always_active if i not in checked]:
            raise ValueError(
                f"{self.family} {stack} active set {sorted(checked)} excludes layer(s) {missing}, which must "
                "always run (T5 block 0 holds the relative position bias that every later block reuses; "
                "without it they silently get a zero position bias). Keep them active."
            )
        return tuple(sorted(checked))

    def set_active_layers(self, indices: Sequence[int] | None, stack: str | None = None) -> None:
        """Sets which layers run in the following forward passes.

        Args:
            indices: Layer indices to run (any order; they run in index order), or ``None`` for all layers.
            stack: The stack to change, or ``None`` to apply the same indices to every stack (NTNG drops and
                grows the same indices in the encoder and the decoder).

        Raises:
            ValueError: If an index is not an int, out of range or repeated, if the set is empty, or if a T5
                set excludes block 0. Nothing is changed when any stack's set is invalid.
        """
        names = self._selected(stack)
        if indices is None:
            chosen = {name: tuple(range(self.num_layers(name))) for name in names}
        else:
            indices = list(indices)  # a one-shot iterator must serve every stack
            chosen = {name: self._validated(indices, name) for name in names}
        for name, active in chosen.items():
            state = self._stacks[name]
            state.active = active
            all_on = len(active) == len(state.full)
            state.subset = None if all_on else nn.ModuleList([state.full[i] for i in active])

    @contextlib.contextmanager
    def active(self, indices: Sequence[int] | None, stack: str | None = None) -> Iterator[None]:
        """Temporarily sets the active layers (see :meth:`set_active_layers`) and restores the previous set.

        Args:
            indices: Layer indices to run, or ``None`` for all layers.
            stack: The stack to change, or ``None`` for every stack.

        Yields:
            Nothing; the previous active sets are restored on exit, also on an exception.
        """
        previous = {name: self.active_layers(name) for name in self.stack_names}
        self.set_active_layers(indices, stack)
        try:
            yield
        finally:
            for name, layer_ids in previous.items():
                self.set_active_layers(layer_ids, name)

    def set_output_scales(self, scales: dict[int, float] | None, stack: str | None = None) -> None:
        """Scales the residual function of layers: layer ``i`` computes ``x + scales[i] * (f(x) - x)``.

        Stochastic depth and PLD's inverted-dropout convention scale a kept layer's residual branch by
        ``1/p`` so its expected contribution matches the full model's. We scale the *whole* layer's
        residual ``f(x) - x``, which for a Pre-LN layer (RoBERTa-PreLN, ModernBERT, T5) is exactly the sum of its
        attention and feed-forward branches. A Post-LN layer ends in a LayerNorm, so ``f(x) - x`` is
        not a residual branch there, and scaling is refused for BERT.

        Args:
            scales: Layer index to scale (layers not listed use 1); ``None`` or ``{}`` removes all scales.
            stack: The stack to change, or ``None`` for every stack.

        Raises:
            ValueError: For a Post-LN BERT model (with any scale other than 1) or an invalid index.
        """
        scales = {self._check_index(i, name, "layer index"): float(v)
                  for name in self._selected(stack) for i, v in (scales or {}).items()}
        if not self.traits.exact_residual_scaling and any(v != 1.0 for v in scales.values()):
            raise ValueError(f"output scaling needs a Pre-LN layer (x + branch); {self.family} layers are Post-LN "
                             "(or of unknown shape): use roberta-prelayernorm or disable scaling")
        for name in self._selected(stack):
            state = self._stacks[name]
            if not state.scale_hooks:
                for index, layer in enumerate(state.full):
                    layer.register_forward_hook(_scaled_output(state.scales, index), with_kwargs=True)
                state.scale_hooks = True
            state.scales.clear()
            state.scales.update({i: v for i, v in scales.items() if v != 1.0})

    @contextlib.contextmanager
    def unscaled(self) -> Iterator[None]:
        """Temporarily removes every output scale (evaluation runs the plain model); restores on exit."""
        saved = {name: dict(state.scales) for name, state in self._stacks.items()}
        for state in self._stacks.values():
            state.scales.clear()
        try:
            yield
        finally:
            for name, scales in saved.items():
                self._stacks[name].scales.update(scales)

    def output_scales(self, stack: str = "encoder") -> dict[int, float]:
        """Returns the layers whose residual function is scaled, with their scales."""
        return dict(self._stack(stack).scales)

    def copy_layer(
        self,
        src: int,
        dst: int,
        *,
        stack: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        optimizer_state: Literal["copy", "reset", "leave"] = "leave",
    ) -> None:
        """Copies the parameters and buffers of layer ``src`` into layer ``dst``, matched by name.

        The copy is in place, so the destination keeps its own tensors and stays registered with the
        optimizer. Names present in only one of the two layers are skipped (T5 block 0's
        ``relative_attention_bias``), and their optimizer state is left alone.

        Args:
            src: Index of the source layer.
            dst: Index of the destination layer.
            stack: The stack to copy in, or ``None`` for every stack.
            optimizer: The optimizer whose state the policy acts on.
            optimizer_state: What happens to the optimizer state of each copied destination parameter:
                ``"copy"`` gives it a deep copy of the source parameter's state (none if the source has
                none), ``"reset"`` removes it so the next step starts fresh, ``"leave"`` keeps it.

        Raises:
            ValueError: If an index is invalid, ``src == dst``, the policy is unknown, a policy other than
                ``"leave"`` comes without an optimizer, or matching tensors differ in shape.
        """
        if optimizer_state not in ("copy", "reset", "leave"):
            raise ValueError(f"optimizer_state must be 'copy', 'reset' or 'leave', got {optimizer_state!r}")
        if optimizer_state != "leave" and optimizer is None:
            raise ValueError(f"optimizer_state={optimizer_state!r} needs the optimizer")
        # Match and check everything first, so that a bad call changes nothing.
        matched: list[tuple[torch.Tensor, torch.Tensor, bool]] = []  # (source, destination, is_parameter)
        for name in self._selected(stack):
            source = self.layers(name)[self._check_index(src, name, "src")]
            target = self.layers(name)[self._check_index(dst, name, "dst")]
            if source is target:
                raise ValueError(f"src and dst are the same layer ({src}) of the {name} stack")
            for getter, is_param in ((nn.Module.named_parameters, True), (nn.Module.named_buffers, False)):
                src_tensors = dict(getter(source))
                for key, dst_tensor in getter(target):
                    src_tensor = src_tensors.get(key)
                    if src_tensor is None:
                        continue
                    if src_tensor.shape != dst_tensor.shape:
                        raise ValueError(
                            f"cannot copy {name} layer {src} -> {dst}, {key}: shape "
                            f"{tuple(src_tensor.shape)} != {tuple(dst_tensor.shape)}"
                        )
                    matched.append((src_tensor, dst_tensor, is_param))
        # Only parameters the optimizer owns may get state: Optimizer.state_dict() fails on any other key.
        owned = set() if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
        for src_tensor, dst_tensor, is_param in matched:
            with torch.no_grad():
                dst_tensor.copy_(src_tensor)
            if optimizer is None or optimizer_state == "leave" or not is_param or id(dst_tensor) not in owned:
                continue
            optimizer.state.pop(dst_tensor, None)
            src_state = optimizer.state.get(src_tensor)
            if optimizer_state == "copy" and src_state:
                optimizer.state[dst_tensor] = {
                    k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                    for k, v in src_state.items()
                }


# encoder.layer.<i>. (BERT-like), encoder/decoder.block.<i>. (T5), model.layers.<i>. (ModernBERT).
_LAYER_KEY = re.compile(r"(?:^|\.)(?:(?:encoder|decoder)\.(?:layer|block)|model\.layers)\.(\d+)\.")
# Config fields that hold the depth of each family's stacks.
_DEPTH_FIELDS = ("num_hidden_layers", "num_layers", "num_decoder_layers")


def truncated_model(model: PreTrainedModel, depth: int) -> PreTrainedModel:
    """A fresh copy of ``model`` keeping only the first ``depth`` layers of every stack.

    Layer stacking grows a prefix of the stacks; when a budget ends before the last growth, the
    model that was trained is that prefix, so this is what gets exported (with its config saying
    so), never the untrained layers behind it.

    Args:
        model: an HF model this module supports.
        depth: layers to keep in each stack (from the bottom).

    Returns:
        A new model of the same class whose config and weights hold ``depth`` layers per stack.
    """
    config = copy.deepcopy(model.config)
    for name in _DEPTH_FIELDS:
        if getattr(config, name, None) is not None:
            setattr(config, name, depth)
    # Per-layer attention types (ModernBERT) must list exactly the kept layers.
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:depth]
    pruned = type(model)(config)
    state = {
        key: value
        for key, value in model.state_dict().items()
        if (match := _LAYER_KEY.search(key)) is None or int(match.group(1)) < depth
    }
    pruned.load_state_dict(state)
    return pruned

"""Build HF-native masked-LM backbones from a config or a checkpoint directory.

We add only what transformers lacks for pretraining: a *sparse* MLM head call (logits only at the
masked positions, as in crammed BERT) and a registry that says, per family, where the encoder and
the prediction head live. Every model stays a plain transformers class, so an export loads with
``AutoModelForMaskedLM.from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormForMaskedLM,
)

from app.errors import ConfigurationError


@dataclass(frozen=True)
class MaskedLMFamily:
    """Where a masked-LM family keeps its parts.

    Attributes:
        config_class: the transformers config class.
        model_class: the transformers ``*ForMaskedLM`` class.
        head_attribute: attribute of the MLM model holding the prediction head.
        position_offset: positions the family reserves before the first token (RoBERTa counts
            positions from ``pad_token_id + 1``, so it needs ``seq_len + pad + 1`` embeddings).
        decoder_attribute: attribute of the MLM model holding the vocabulary projection when it
            is not part of the head (ModernBERT: ``head`` is the transform, ``decoder`` the tied
            projection); None when the head ends in it (BERT's ``cls``, RoBERTa's ``lm_head``).
        config_defaults: config fields a fresh model gets unless the overrides set them
            (ModernBERT's defaults name special-token ids of its own 50k vocabulary).
        attn_implementation: attention kernel forced on every build and load (None: transformers'
            choice). ModernBERT gets ``sdpa``: it runs on CPU and GPU without flash-attn, and our
            packed blocks have no padding, so its unpadded (flash-attn) path is never needed.
    """

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    head_attribute: str
    position_offset: bool = False
    decoder_attribute: str | None = None
    config_defaults: tuple[tuple[str, Any], ...] = ()
    attn_implementation: str | None = None

    def prediction_head(self, model: PreTrainedModel) -> nn.Module:
        """The module mapping final hidden states to vocabulary logits (head, then decoder)."""
        head: nn.Module = getattr(model, self.head_attribute)
        if self.decoder_attribute is None:
            return head
        return nn.Sequential(head, getattr(model, self.decoder_attribute))


MASKED_LM_FAMILIES: dict[str, MaskedLMFamily] = {
    "bert": MaskedLMFamily(BertConfig, BertForMaskedLM, "cls"),
    "roberta-prelayernorm": MaskedLMFamily(
        RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM, "lm_head", position_offset=True
    ),
    # Rotary positions (max_sequence_length = max_position_embeddings), Pre-LN layers in
    # ``model.layers``, head transform ``head`` and tied ``decoder``. Its own ``sparse_prediction``
    # option stays off: masked_lm_logits selects the labelled positions itself.
    "modernbert": MaskedLMFamily(
        ModernBertConfig,
        ModernBertForMaskedLM,
        "head",
        decoder_attribute="decoder",
        config_defaults=(
            ("pad_token_id", 0),
            ("bos_token_id", None),
            ("eos_token_id", None),
            ("cls_token_id", None),
            ("sep_token_id", None),
        ),
        attn_implementation="sdpa",
    ),
}


def masked_lm_family(name: str) -> MaskedLMFamily:
    """Look up a backbone family by name (``config.model_type``).

    Raises:
        ConfigurationError: for an unknown name, listing the known ones.
    """
    if name not in MASKED_LM_FAMILIES:
        known = ", ".join(sorted(MASKED_LM_FAMILIES))
        raise ConfigurationError(f"unknown backbone {name!r}; known masked-LM backbones: {known}")
    return MASKED_LM_FAMILIES[name]


def build_masked_lm(
    backbone: str,
    overrides: dict[str, Any] | None = None,
    checkpoint: str | None = None,
) -> tuple[PreTrainedModel, MaskedLMFamily]:
    """Create a masked LM from a family name and config overrides, or load one from a directory.

    Args:
        backbone: family name (see ``MASKED_LM_FAMILIES``); ignored when ``checkpoint`` is given,
            whose ``config.json`` names the family.
        overrides: config fields to set (``num_hidden_layers``, ``hidden_size``, ...).
        checkpoint: an HF-format directory (or hub name) to load weights from.

    Returns:
        The model and its family description.
    """
    overrides = dict(overrides or {})
    if checkpoint is not None:
        try:
            config = AutoConfig.from_pretrained(checkpoint, **overrides)
        except OSError as err:
            raise ConfigurationError(f"cannot load checkpoint {checkpoint!r}: {err}") from err
        family = masked_lm_family(config.model_type)
        attention = {"attn_implementation": family.attn_implementation} if family.attn_implementation else {}
        model = AutoModelForMaskedLM.from_pretrained(checkpoint, config=config, **attention)
        return model, family
    family = masked_lm_family(backbone)
    overrides = dict(family.config_defaults) | overrides
    try:
        config = family.config_class(**overrides)
    except (TypeError, ValueError) as err:
        raise ConfigurationError(f"invalid {backbone} config {overrides}: {err}") from err
    if family.attn_implementation is not None:
        config._attn_implementation = family.attn_implementation
    return family.model_class(config), family


def max_sequence_length(config: PretrainedConfig, family: MaskedLMFamily) -> int:
    """The longest input the position embeddings of ``config`` can take."""
    if family.position_offset:
        return config.max_position_embeddings - config.pad_token_id - 1
    return config.max_position_embeddings


def masked_lm_logits(
    model: PreTrainedModel,
    family: MaskedLMFamily,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the encoder and the MLM head, sparsely when labels are given.

    With ``labels``, the head runs only on positions whose label is not -100: for 15 % masking that
    skips 85 % of the vocabulary projection, the largest matmul of a small BERT.

    Args:
        model: a ``*ForMaskedLM`` model of ``family``.
        family: its family description.
        input_ids: ``[batch, seq]`` token ids.
        labels: ``[batch, seq]`` targets with -100 where no loss is taken, or None for dense logits.
        attention_mask: optional ``[batch, seq]`` mask (packed blocks need none).

    Returns:
        ``(logits, targets)``: ``[n_masked, vocab]`` logits and ``[n_masked]`` targets in row-major
        order of the masked positions, or ``([batch, seq, vocab], None)`` without labels.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head = family.prediction_head(model)
    if labels is None:
        return head(hidden), None
    selected = labels != -100
    return head(hidden[selected]), labels[selected]

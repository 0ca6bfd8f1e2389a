"""Model shape knobs as Tay et al. name them ("Scale Efficiently", 2021; the t5-efficient models).

``NL`` both depths, ``EL`` encoder depth, ``DL`` decoder depth, ``DM`` model width, ``FF`` feed-forward
width, ``KV`` width per attention head, ``NH`` heads: so ``--model.init_args.shape='{NL: 24, DM: 512}'``
gives a DeepNarrow variant of a recipe, compared at equal RST like any method (the paper's gains
from depth flatten around 32-36 layers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.errors import ConfigurationError

# Knob -> the HF config fields it sets, per family.
SHAPE_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "t5": {"NL": ("num_layers", "num_decoder_layers"), "EL": ("num_layers",), "DL": ("num_decoder_layers",),
           "DM": ("d_model",), "FF": ("d_ff",), "KV": ("d_kv",), "NH": ("num_heads",)},
    # BERT-style encoders: one stack, and HF derives the head width as hidden_size / heads.
    "encoder": {"NL": ("num_hidden_layers",), "DM": ("hidden_size",), "FF": ("intermediate_size",),
                "NH": ("num_attention_heads",)},
}


def apply_shape(config: Mapping[str, Any], shape: Mapping[str, int] | None, family: str) -> dict[str, Any]:
    """``config`` with the shape knobs applied (knobs win over the same fields in ``config``).

    Args:
        config: HF config fields.
        shape: knob -> value (``NL``, ``EL``, ``DL``, ``DM``, ``FF``, ``KV``, ``NH``); None or {} for none.
        family: ``t5`` or ``encoder`` (BERT, RoBERTa-PreLN).

    Returns:
        The config fields to build the model with.

    Raises:
        ConfigurationError: for a knob the family does not have, a value below 1, or (encoders) a
            ``KV`` that is not ``DM / NH``.
    """
    fields, shape = dict(config), dict(shape or {})
    knobs = SHAPE_FIELDS[family]
    for knob, value in shape.items():
        if knob == "KV" and family == "encoder":
            continue  # checked below: HF encoders have no free head width
        if knob not in knobs:
            raise ConfigurationError(f"shape knob {knob!r} does not apply to {family} models; they have "
                                     f"{', '.join(sorted(knobs))}" + (" (and KV = DM / NH)" if family == "encoder" else ""))
        if int(value) < 1:
            raise ConfigurationError(f"shape knob {knob} must be >= 1, got {value}")
        for name in knobs[knob]:
            fields[name] = int(value)
    if family == "encoder" and "KV" in shape:
        width, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
        if width is None or heads is None or width != int(shape["KV"]) * heads:
            raise ConfigurationError(f"shape KV {shape['KV']} must equal DM / NH = {width} / {heads} for this encoder")
    return fields

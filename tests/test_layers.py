"""Tests for app.model.layers.LayerAdapter on tiny BERT, RoBERTa-PreLN and T5 models built from configs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormForMaskedLM,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)
from transformers.utils import ModelOutput

from app.model.layers import LayerAdapter

VOCAB = 100


def _encoder(config_class, model_class, max_positions: int) -> nn.Module:
    torch.manual_seed(0)
    config = config_class(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=max_positions, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return model_class(config).eval()


def _bert() -> nn.Module:
    return _encoder(BertConfig, BertForMaskedLM, 32)


def _roberta_preln() -> nn.Module:
    return _encoder(RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM, 40)


def _modernbert() -> nn.Module:
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, global_attn_every_n_layers=1, pad_token_id=0, bos_token_id=None,
        eos_token_id=None, cls_token_id=None, sep_token_id=None, attn_implementation="sdpa",
    )  # fmt: skip
    return ModernBertForMaskedLM(config).eval()


def _t5_config() -> T5Config:
    return T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip


def _t5() -> nn.Module:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(_t5_config()).eval()


ENCODERS = {"bert": _bert, "roberta-prelayernorm": _roberta_preln, "modernbert": _modernbert}
ALL = {**ENCODERS, "t5": _t5}


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
    return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (2, 12), generator=gen)}


def _t5_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(1, VOCAB, (2, 12), generator=gen),
        "labels": torch.randint(1, VOCAB, (2, 6), generator=gen),
    }


def _run(model: nn.Module, family: str) -> ModelOutput:
    return model(**(_t5_batch() if family == "t5" else _batch()))


def _delete_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A deep copy of a model (without an adapter) whose layer lists hold only ``keep``."""
    pruned = copy.deepcopy(model)
    base = pruned.base_model
    if isinstance(pruned, T5ForConditionalGeneration):
        owners = [(base.encoder, "block"), (base.decoder, "block")]
    elif isinstance(pruned, ModernBertForMaskedLM):
        owners = [(base, "layers")]
    else:
        owners = [(base.encoder, "layer")]
    for owner, attr in owners:
        full = getattr(owner, attr)
        setattr(owner, attr, nn.ModuleList([full[i] for i in keep]))
    return pruned


@pytest.mark.parametrize("family", list(ALL))
def test_all_active_is_bitwise_identical(family: str) -> None:
    model = ALL[family]()
    reference = copy.deepcopy(model)
    adapter = LayerAdapter(model)
    assert adapter.family == family
    assert adapter.all_active()
    expected = _run(reference, family)
    assert torch.equal(_run(model, family).logits, expected.logits)
    # Dropping and then restoring all layers also goes back to the exact original computation.
    adapter.set_active_layers([0, 2])
    adapter.set_active_layers(None)
    assert adapter.all_active()
    assert torch.equal(_run(model, family).logits, expected.logits)


@pytest.mark.parametrize("family", list(ENCODERS))
@pytest.mark.parametrize("keep", [[0, 2], [1, 3], [3]])
def test_encoder_subset_equals_deleted_layers(family: str, keep: list[int]) -> None:
    model = ENCODERS[family]()
    reference = _delete_layers(model, keep)
    adapter = LayerAdapter(model)
    adapter.set_active_layers(reversed(keep))  # any order: layers still run in index order
    assert adapter.active_layers() == keep
    assert adapter.active_depth() == {"encoder": len(keep)}
    out = model(**_batch(), output_hidden_states=True)
    expected = reference(**_batch())
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)
    assert len(out.hidden_states) == len(keep) + 1


def test_t5_subset_equals_deleted_blocks() -> None:
    model = _t5()
    reference = _delete_layers(model, [0, 2])
    adapter = LayerAdapter(model)
    assert adapter.stack_names == ("encoder", "decoder")
    adapter.set_active_layers([0, 2])  # stack=None: the same indices in encoder and decoder
    assert adapter.active_depth() == {"encoder": 2, "decoder": 2}
    torch.testing.assert_close(model(**_t5_batch()).loss, reference(**_t5_batch()).loss)
    # One stack at a time: only the decoder loses block 1.
    adapter.set_active_layers(None)
    adapter.set_active_layers([0, 2], stack="decoder")
    assert adapter.active_depth() == {"encoder": 3, "decoder": 2}
    decoder_only = copy.deepcopy(reference)
    decoder_only.encoder.block = copy.deepcopy(model.encoder.block)
    torch.testing.assert_close(model(**_t5_batch()).loss, decoder_only(**_t5_batch()).loss)


def test_t5_encoder_model_has_one_stack() -> None:
    model = T5EncoderModel(_t5_config())
    adapter = LayerAdapter(model)
    assert (adapter.family, adapter.stack_names) == ("t5", ("encoder",))
    assert adapter.num_layers() == 3


@pytest.mark.parametrize("family", list(ALL))
def test_inactive_layers_get_no_gradient(family: str) -> None:
    model = ALL[family]().train()
    adapter = LayerAdapter(model)
    adapter.set_active_layers([0, 2])
    _run(model, family).loss.backward()
    for stack in adapter.stack_names:
        for index, layer in enumerate(adapter.layers(stack)):
            grads = [p.grad for p in layer.parameters()]
            if index in (0, 2):
                assert all(g is not None for g in grads), (stack, index)
            else:
                assert all(g is None for g in grads), (stack, index)


def test_state_dict_and_names_unchanged_and_context_restores() -> None:
    model = _bert()
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    adapter = LayerAdapter(model)
    with adapter.active([1]):
        assert adapter.active_layers() == [1]
        model(**_batch())
        assert list(model.state_dict()) == keys
        assert [n for n, _ in model.named_parameters()] == names
        assert len(adapter.layers()) == 4 and model.bert.encoder.layer is adapter.layers()
        with adapter.active([0, 3]):
            assert adapter.active_layers() == [0, 3]
        assert adapter.active_layers() == [1]
    assert adapter.all_active()
    with pytest.raises(RuntimeError), adapter.active([2]):
        raise RuntimeError("boom")
    assert adapter.all_active()


def test_forward_swaps_subset_and_restores_after_exception_and_reentry() -> None:
    model = _bert()
    adapter = LayerAdapter(model)
    adapter.set_active_layers([0, 2])
    encoder = model.bert.encoder
    seen: list[int] = []

    def reenter(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.append(len(encoder.layer))
        if len(seen) == 1:  # a nested call of the owner must not restore the list for the outer call
            encoder(output)
            seen.append(len(encoder.layer))

    handle = adapter.layers()[0].register_forward_hook(reenter)
    model(**_batch())
    handle.remove()
    assert seen == [2, 2, 2]
    assert encoder.layer is adapter.layers()

    def fail(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        raise RuntimeError("layer failed")

    handle = adapter.layers()[2].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="layer failed"):
        model(**_batch())
    handle.remove()
    assert encoder.layer is adapter.layers() and len(encoder.layer) == 4
    torch.testing.assert_close(model(**_batch()).logits, _delete_layers(_bert(), [0, 2])(**_batch()).logits)


def test_adapters_on_one_model_share_the_active_set() -> None:
    model = _bert()
    first = LayerAdapter(model)
    first.set_active_layers([0, 1])
    assert LayerAdapter(model).active_layers() == [0, 1]
    # Two adapters must not stack two pairs of hooks.
    assert len(model.bert.encoder._forward_pre_hooks) == 1


def test_t5_refuses_sets_without_block_zero() -> None:
    adapter = LayerAdapter(_t5())
    for stack in (None, "encoder", "decoder"):
        with pytest.raises(ValueError, match="block 0.*relative position bias"):
            adapter.set_active_layers([1, 2], stack=stack)
    with pytest.raises(ValueError, match="block 0"), adapter.active([2]):
        pass
    assert adapter.all_active()


@pytest.mark.parametrize(("src", "dst"), [(2, 0), (0, 2)])
def test_t5_copy_by_name_skips_relative_attention_bias(src: int, dst: int) -> None:
    model = _t5()
    adapter = LayerAdapter(model)
    bias_name = "layer.0.SelfAttention.relative_attention_bias.weight"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**_t5_batch()).loss.backward()
    optimizer.step()
    bias_before = {s: adapter.layers(s)[0].state_dict()[bias_name].clone() for s in adapter.stack_names}
    adapter.copy_layer(src, dst, optimizer=optimizer, optimizer_state="reset")  # stack=None: both stacks
    for stack in adapter.stack_names:
        source = dict(adapter.layers(stack)[src].named_parameters())
        target = dict(adapter.layers(stack)[dst].named_parameters())
        shared = source.keys() & target.keys()
        assert (source.keys() | target.keys()) - shared == {bias_name}
        for name in shared:
            assert torch.equal(source[name], target[name]), (stack, name)
            assert target[name] not in optimizer.state
        bias = adapter.layers(stack)[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(bias, bias_before[stack]) and bias in optimizer.state
    # stack="encoder" leaves the decoder alone.
    decoder_before = copy.deepcopy(adapter.layers("decoder")[1].state_dict())
    adapter.copy_layer(2, 1, stack="encoder")
    for key, value in adapter.layers("decoder")[1].state_dict().items():
        assert torch.equal(value, decoder_before[key])


def _adamw_after_step(model: nn.Module, adapter: LayerAdapter, active: list[int]) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with adapter.active(active):
        model(**_batch()).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def _params(adapter: LayerAdapter, index: int) -> dict[str, nn.Parameter]:
    return dict(adapter.layers()[index].named_parameters())


def test_copy_layer_values_and_distinct_tensors() -> None:
    model = _bert()
    adapter = LayerAdapter(model)
    adapter.copy_layer(0, 3)
    for name, p in _params(adapter, 3).items():
        source = _params(adapter, 0)[name]
        assert torch.equal(p, source) and p.data_ptr() != source.data_ptr()
    with torch.no_grad():
        _params(adapter, 0)["output.dense.weight"].add_(1.0)  # the copy does not alias the source
    source, target = _params(adapter, 0)["output.dense.weight"], _params(adapter, 3)["output.dense.weight"]
    assert not torch.equal(source, target)


def test_copy_layer_optimizer_copy() -> None:
    model = _bert()
    adapter = LayerAdapter(model)
    optimizer = _adamw_after_step(model, adapter, [0, 1])  # layers 2 and 3 have no state
    adapter.copy_layer(0, 2, optimizer=optimizer, optimizer_state="copy")
    for name, p in _params(adapter, 2).items():
        src_state, dst_state = optimizer.state[_params(adapter, 0)[name]], optimizer.state[p]
        assert dst_state.keys() == src_state.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in src_state:
            assert torch.equal(dst_state[key], src_state[key]) and dst_state[key] is not src_state[key]
    # A source without state leaves the destination without state.
    adapter.copy_layer(3, 1, optimizer=optimizer, optimizer_state="copy")
    assert all(p not in optimizer.state for p in _params(adapter, 1).values())
    optimizer.state_dict()
    model(**_batch()).loss.backward()
    optimizer.step()


def test_copy_layer_optimizer_reset_and_leave() -> None:
    model = _bert()
    adapter = LayerAdapter(model)
    optimizer = _adamw_after_step(model, adapter, [0, 1, 2, 3])
    leave_before = {
        name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in _params(adapter, 2).items()
    }
    adapter.copy_layer(0, 1, optimizer=optimizer, optimizer_state="reset")
    assert all(p not in optimizer.state for p in _params(adapter, 1).values())
    assert all(p in optimizer.state for p in _params(adapter, 0).values())
    adapter.copy_layer(0, 2, optimizer=optimizer, optimizer_state="leave")
    for name, p in _params(adapter, 2).items():
        for key, value in leave_before[name].items():
            assert torch.equal(optimizer.state[p][key], value)
    with pytest.raises(ValueError, match="optimizer"):
        adapter.copy_layer(0, 1, optimizer_state="reset")
    with pytest.raises(ValueError, match="optimizer_state"):
        adapter.copy_layer(0, 1, optimizer=optimizer, optimizer_state="move")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("indices", "match"),
    [([4], "out of range"), ([-1], "out of range"), ([1, 1], "duplicate"), ([], "empty"),
     ([1.0], "must be an int"), ([True], "must be an int")],
)  # fmt: skip
def test_bad_indices_raise(indices: list, match: str) -> None:
    adapter = LayerAdapter(_bert())
    with pytest.raises(ValueError, match=match):
        adapter.set_active_layers(indices)
    assert adapter.all_active()


def test_bad_stack_copy_and_model_raise() -> None:
    adapter = LayerAdapter(_bert())
    with pytest.raises(ValueError, match="unknown stack"):
        adapter.set_active_layers([0], stack="decoder")
    with pytest.raises(ValueError, match="same layer"):
        adapter.copy_layer(1, 1)
    with pytest.raises(ValueError, match="out of range"):
        adapter.copy_layer(0, 4)
    with pytest.raises(ValueError, match="RoBERTa-PreLayerNorm.*T5"):
        LayerAdapter(nn.Linear(4, 4))


def test_output_scale_zero_equals_skipping_and_one_is_identity() -> None:
    model, batch = _roberta_preln(), {"input_ids": torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))}
    adapter = LayerAdapter(model)
    with torch.no_grad():
        base = model(**batch).logits
        adapter.set_output_scales({1: 1.0})
        assert torch.equal(model(**batch).logits, base)
        with adapter.active([0, 2, 3]):
            skipped = model(**batch).logits
        adapter.set_output_scales({1: 0.0})
        torch.testing.assert_close(model(**batch).logits, skipped)
        adapter.set_output_scales({1: 2.0})
        assert not torch.allclose(model(**batch).logits, base)
        adapter.set_output_scales(None)
        assert torch.equal(model(**batch).logits, base) and adapter.output_scales() == {}


def test_output_scales_on_t5_blocks_and_refused_for_post_ln_bert() -> None:
    model = _t5()
    adapter = LayerAdapter(model)
    batch = _t5_batch()
    with torch.no_grad():
        with adapter.active([0, 1]):
            without_block_2 = model(**batch).loss
        adapter.set_output_scales({2: 0.0})
        torch.testing.assert_close(model(**batch).loss, without_block_2)
    with pytest.raises(ValueError, match="Post-LN"):
        LayerAdapter(_bert()).set_output_scales({0: 2.0})


def test_unscaled_context_removes_and_restores_scales() -> None:
    model = _roberta_preln()
    adapter = LayerAdapter(model)
    adapter.set_output_scales({1: 2.0, 2: 0.5})
    with adapter.unscaled():
        assert adapter.output_scales() == {}
    assert adapter.output_scales() == {1: 2.0, 2: 0.5}

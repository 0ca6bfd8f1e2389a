"""SpanCorruptionModel (T5 v1.1): the untied head, the export, the passes methods use, shape knobs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

from app.errors import ConfigurationError
from app.model.shapes import apply_shape
from app.modules.span_corruption import SpanCorruptionModel

TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 3, "num_decoder_layers": 3,
           "dropout_rate": 0.1}


def tiny_t5(**kwargs) -> SpanCorruptionModel:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=1e-3))
    return SpanCorruptionModel(config=TINY_T5, vocab_size=120, pad_token_id=0, seq_len=24, **kwargs)


def t5_batch(rows: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 120, (rows, 24), generator=generator),
            "labels": torch.randint(3, 120, (rows, 6), generator=generator), "example_ids": torch.arange(rows)}


def test_t5_v1_1_base_has_an_untied_head_of_247_6m_parameters():
    config = {"d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12,
              "vocab_size": 32128}
    with torch.device("meta"):
        module = SpanCorruptionModel(config=config, vocab_size=32100, pad_token_id=0, seq_len=512)
    model = module.model
    assert sum(p.numel() for p in model.parameters()) == 247_577_856
    assert model.lm_head.weight is not model.shared.weight
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    assert model.config.decoder_start_token_id == 0 and model.config.feed_forward_proj == "gated-gelu"
    assert module.model_signature() == {"family": "t5", "layers": {"encoder": 12, "decoder": 12}, "hidden": 768,
                                        "heads": 12, "ffn": 2048, "vocab": 32128, "seq_len": 512}


def test_export_reloads_untied_in_plain_transformers_with_equal_logits_and_generates(tmp_path):
    module = tiny_t5()
    with torch.no_grad():
        module.model.lm_head.weight.add_(1.0)  # make sure the head differs from the embedding
    module.eval()
    batch = t5_batch()
    with torch.no_grad():
        expected = module.model(input_ids=batch["input_ids"], labels=batch["labels"]).logits
    module.export_pretrained(tmp_path / "hf")
    for loader in (T5ForConditionalGeneration, AutoModelForSeq2SeqLM):
        reloaded = loader.from_pretrained(tmp_path / "hf").eval()
        assert reloaded.lm_head.weight is not reloaded.shared.weight
        assert all(torch.equal(value, module.model.state_dict()[key]) for key, value in reloaded.state_dict().items())
        with torch.no_grad():  # HF's unfused RMSNorm and GELU: the same function up to float rounding
            torch.testing.assert_close(reloaded(input_ids=batch["input_ids"], labels=batch["labels"]).logits, expected,
                                       rtol=1e-5, atol=1e-5)
    assert reloaded.config.dropout_rate == 0.1  # the fine-tuning dropout, not the pretraining 0
    generated = reloaded.generate(batch["input_ids"][:1], max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 1 and generated.shape[1] >= 2
    continued = SpanCorruptionModel(checkpoint=str(tmp_path / "hf"), vocab_size=120, pad_token_id=0)
    assert continued.model.lm_head.weight is not continued.model.shared.weight


def test_pretraining_runs_without_dropout_and_the_loss_falls():
    module = tiny_t5()
    assert all(m.p == 0.0 for m in module.model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(m.dropout == 0.0 for m in module.model.modules() if isinstance(getattr(m, "dropout", None), float))
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    batch, losses = t5_batch(), []
    for _ in range(20):
        loss = module.loss(batch)
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.7 * losses[0]


def test_per_example_losses_average_to_the_batch_loss_and_the_hessian_pass_counts_targets():
    module = tiny_t5()
    batch = t5_batch()
    per_example = module.per_example_losses(batch, charge=False)
    assert per_example.shape == (4,)
    torch.testing.assert_close(per_example.mean(), module.loss(batch).detach())
    module.zero_grad()
    assert module.hessian_pass(batch, charge=False) == batch["labels"].numel()
    assert module.model.lm_head.weight.grad is not None


def test_training_builds_no_key_value_cache(monkeypatch):
    import transformers.models.t5.modeling_t5 as modeling_t5

    def refuse(*args, **kwargs):
        raise AssertionError("a key/value cache was built for a training pass")

    module = tiny_t5()
    monkeypatch.setattr(modeling_t5, "DynamicCache", refuse)
    module.loss(t5_batch()).backward()
    module.per_example_losses(t5_batch(), charge=False)


def test_block_zero_is_always_active_for_t5():
    module = tiny_t5()
    assert module.layers.traits.always_active == (0,)
    with pytest.raises(ValueError, match="relative position bias"):
        module.layers.set_active_layers([1, 2])


def test_a_smaller_model_vocabulary_than_the_tokenizer_is_refused():
    with pytest.raises(ConfigurationError, match="embeds only 100"):
        SpanCorruptionModel(config={**TINY_T5, "vocab_size": 100}, vocab_size=120, pad_token_id=0)


@pytest.mark.parametrize("shape, family, expected", [
    ({"NL": 8, "DM": 512}, "t5", {"num_layers": 8, "num_decoder_layers": 8, "d_model": 512}),
    ({"EL": 12, "DL": 2, "KV": 32, "NH": 16, "FF": 1024}, "t5",
     {"num_layers": 12, "num_decoder_layers": 2, "d_kv": 32, "num_heads": 16, "d_ff": 1024}),
    ({"NL": 24, "DM": 512, "NH": 8, "KV": 64}, "encoder", {"num_hidden_layers": 24, "hidden_size": 512,
                                                           "num_attention_heads": 8}),
])
def test_shape_knobs_set_the_config_fields(shape, family, expected):
    assert apply_shape({"d_model": 768}, shape, family).items() >= expected.items()


@pytest.mark.parametrize("shape, family, message", [
    ({"EL": 4}, "encoder", "does not apply"), ({"NL": 0}, "t5", ">= 1"), ({"KV": 32, "DM": 512, "NH": 8}, "encoder", "DM / NH"),
])
def test_bad_shape_knobs_are_refused(shape, family, message):
    with pytest.raises(ConfigurationError, match=message):
        apply_shape({}, shape, family)


def test_shape_knobs_build_the_model():
    module = SpanCorruptionModel(config=TINY_T5, shape={"EL": 4, "DL": 2}, vocab_size=120, pad_token_id=0)
    assert (module.layers.num_layers("encoder"), module.layers.num_layers("decoder")) == (4, 2)


def test_fused_kernels_compute_hf_t5s_function_and_leave_the_checkpoint_alone(tmp_path):
    from transformers import T5ForConditionalGeneration

    from app.model.fused_t5 import FusedT5LayerNorm

    config = {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}
    torch.manual_seed(0)
    fused = SpanCorruptionModel(config=config, vocab_size=100, pad_token_id=0)
    torch.manual_seed(0)
    plain = SpanCorruptionModel(config=config, vocab_size=100, pad_token_id=0, fused_kernels=False)
    assert any(isinstance(m, FusedT5LayerNorm) for m in fused.model.modules())
    assert not any(isinstance(m, FusedT5LayerNorm) for m in plain.model.modules())
    generator = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(2, 100, (4, 24), generator=generator),
             "labels": torch.randint(2, 100, (4, 6), generator=generator)}
    losses = [module.loss(batch) for module in (fused, plain)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for module, loss in zip((fused, plain), losses):
        loss.backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The export is a stock HF checkpoint with the stock config.
    fused.export_pretrained(tmp_path / "hf")
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert loaded.config.dense_act_fn == "gelu_new" and fused.model.state_dict().keys() == plain.model.state_dict().keys()

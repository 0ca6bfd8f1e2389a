"""MaskedLanguageModel: loss, sparse head, export, input checks, optimisation pieces."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForMaskedLM

from app.model.backbones import masked_lm_logits
from app.errors import ConfigurationError
from app.model.param_groups import weight_decay_groups
from app.modules.masked_lm import MaskedLanguageModel
from app.model.schedules import (
    OneCycleTriangle,
    WarmupCosine,
    WarmupLinear,
    WarmupStableDecay,
)
from tests.conftest import TINY_CONFIG, mlm_batch


def tiny_model(backbone: str = "roberta-prelayernorm", **kwargs) -> MaskedLanguageModel:
    torch.manual_seed(0)
    return MaskedLanguageModel(backbone=backbone, config=dict(TINY_CONFIG), vocab_size=100, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("backbone", ["bert", "roberta-prelayernorm"])
def test_sparse_head_loss_equals_dense(backbone):
    sparse = tiny_model(backbone, sparse_prediction=True).eval()
    dense = tiny_model(backbone, sparse_prediction=False).eval()
    dense.load_state_dict(sparse.state_dict())
    batch = mlm_batch()
    torch.testing.assert_close(sparse.loss(batch), dense.loss(batch))


def test_one_optimizer_step_lowers_the_loss():
    model = tiny_model()
    optimizer = torch.optim.AdamW(weight_decay_groups(model.model), lr=1e-2)
    batch = mlm_batch()
    before = model.loss(batch)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert model.loss(batch) < before.detach()


def test_per_example_losses_match_the_batch_loss():
    model = tiny_model().eval()
    batch = mlm_batch()
    per_example = model.per_example_losses(batch)
    counts = (batch["labels"] != -100).sum(1)
    assert per_example.shape == (4,)
    torch.testing.assert_close((per_example * counts).sum() / counts.sum(), model.loss(batch).detach())


@pytest.mark.parametrize("backbone", ["bert", "roberta-prelayernorm"])
def test_export_round_trip_gives_identical_logits(tmp_path, backbone):
    model = tiny_model(backbone).eval()
    model.export_pretrained(tmp_path / "hf")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    batch = mlm_batch()
    with torch.no_grad():
        expected, _ = masked_lm_logits(model.model, model.family, batch["input_ids"], None)
        torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits, expected, rtol=0, atol=0)
    # The export carries the fine-tuning dropout even though pretraining ran with dropout off.
    assert loaded.config.hidden_dropout_prob == 0.1
    assert all(m.p == 0.0 for m in model.model.modules() if isinstance(m, torch.nn.Dropout))


def test_checkpoint_directory_continues_training(tmp_path):
    tiny_model().export_pretrained(tmp_path / "hf")
    resumed = MaskedLanguageModel(checkpoint=str(tmp_path / "hf"), vocab_size=100, pad_token_id=0)
    assert resumed.model.config.num_hidden_layers == 2
    with pytest.raises(ConfigurationError, match="vocab_size 100"):
        MaskedLanguageModel(checkpoint=str(tmp_path / "hf"), vocab_size=120, pad_token_id=0)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ConfigurationError, match="unknown backbone 'gpt9'.*bert, roberta-prelayernorm"):
        MaskedLanguageModel(backbone="gpt9", config=dict(TINY_CONFIG), vocab_size=100)
    with pytest.raises(ConfigurationError, match="tokenizer has 100 tokens but model config.vocab_size is 50"):
        MaskedLanguageModel(config={**TINY_CONFIG, "vocab_size": 50}, vocab_size=100, pad_token_id=0)
    # RoBERTa-style positions start after the pad id: 40 embeddings, pad 0 -> at most 39 tokens.
    with pytest.raises(ConfigurationError, match="seq_len 64 exceeds the model's maximum of 39"):
        MaskedLanguageModel(config=dict(TINY_CONFIG), vocab_size=100, pad_token_id=0, seq_len=64)


def test_no_weight_decay_on_biases_and_norms():
    model = tiny_model()
    decay, no_decay = weight_decay_groups(model.model)
    names = {id(p): n for n, p in model.model.named_parameters()}

    def exempt(name: str) -> bool:
        return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name

    assert no_decay["weight_decay"] == 0.0
    assert all(exempt(names[id(p)]) for p in no_decay["params"])
    assert not any(exempt(names[id(p)]) for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.model.parameters()))


@pytest.mark.parametrize(
    "schedule, points",
    [
        (OneCycleTriangle(), {0.0: 0.0, 0.25: 0.5, 0.5: 1.0, 0.75: 0.5, 1.0: 0.0, 1.5: 0.0}),
        (WarmupCosine(warmup_fraction=0.2, start=0.5, floor=1e-5), {0.0: 0.5, 0.1: 0.75, 0.2: 1.0, 0.6: 0.5, 1.0: 1e-5}),
        (WarmupLinear(warmup_fraction=0.1), {0.0: 0.0, 0.1: 1.0, 0.55: 0.5, 1.0: 0.0}),
        (WarmupStableDecay(warmup_fraction=0.1, decay_fraction=0.2), {0.05: 0.5, 0.5: 1.0, 0.9: 0.5, 1.0: 0.0}),
    ],
)
def test_schedules_hit_their_defining_points(schedule, points):
    for progress, expected in points.items():
        assert schedule(progress) == pytest.approx(expected, abs=1e-9)


def test_export_at_a_grown_depth_holds_only_the_trained_layers(tmp_path):
    model = tiny_model().eval()
    model.model_depth = 1  # as layer stacking leaves it before its next growth
    model.export_pretrained(tmp_path / "hf")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.num_hidden_layers == 1 and len(loaded.roberta_prelayernorm.encoder.layer) == 1
    batch = mlm_batch()
    with torch.no_grad(), model.layers.active([0]):
        expected, _ = masked_lm_logits(model.model, model.family, batch["input_ids"], None)
    torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits, expected, rtol=0, atol=0)


def test_lr_adjustments_multiply_the_schedule():
    model = tiny_model(lr_schedule=OneCycleTriangle())
    model.lr_adjustments["half"] = lambda progress: 0.5
    model.budget_progress = lambda: 0.5  # the schedule's peak
    optimizer = model.configure_optimizers()
    model.log = lambda *args, **kwargs: None
    model.on_before_optimizer_step(optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * optimizer.param_groups[0]["initial_lr"])


def test_updated_fraction_counts_parameters_with_gradients():
    from app.modules.budgeted import _updated_fraction

    model = tiny_model()
    optimizer = model.configure_optimizers()
    with model.layers.active([0]):
        model.loss(mlm_batch()).backward()
    layer = sum(p.numel() for p in model.layers.layers()[1].parameters())
    total = sum(p.numel() for p in model.model.parameters())
    assert _updated_fraction(optimizer) == pytest.approx(1 - layer / total)


@pytest.mark.parametrize("progress_bar", [False, True])
def test_per_update_values_are_logged_only_on_the_updates_lightning_writes(tmp_path, progress_bar):
    from tests.conftest import fit_tiny, tiny_masked_lm

    module, logged = tiny_masked_lm(), []
    log = module.log
    module.log = lambda name, value, **kwargs: (logged.append((module.trainer.global_step, name)), log(name, value, **kwargs))
    fit_tiny(module, [], tmp_path, max_steps=6, log_every_n_steps=3, enable_progress_bar=progress_bar)
    assert [step for step, name in logged if name == "train/lr"] == [2, 5]  # the 3rd and 6th updates
    loss_steps = [step for step, name in logged if name == "train/loss"]
    assert loss_steps == (list(range(6)) if progress_bar else [2, 5])  # a progress bar shows it every update

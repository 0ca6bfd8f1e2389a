"""ModernBERT as a masked-LM backbone: the crammed (bert-c5) shape, the sparse head, the layer adapter,
budgeted fits with layer dropping and stacking, export and fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from transformers import AutoModelForMaskedLM, AutoTokenizer, ModernBertForMaskedLM

from app.model.backbones import build_masked_lm, masked_lm_logits, max_sequence_length
from app.model.layers import truncated_model
from app.modules.finetuner import FineTuner
from app.modules.masked_lm import MaskedLanguageModel
from callbacks.budget import ReferenceTimeBudget
from callbacks.layer_drop import ProgressiveLayerDrop
from callbacks.stacking import LayerStacking
from datamodules.tasks.datamodule import CandidateCollator, TaskDataModule
from datamodules.tasks.registry import get_task
from tests.conftest import REPO_ROOT, fit_tiny, mlm_batch, run_cli, write_profile
from tests.test_finetune import CHOICE_EXAMPLES, MAX_LENGTH, choice_spec, tiny_tokenizer, write_glue, write_superglue

TINY = {
    "num_hidden_layers": 4,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 16,
    "global_attn_every_n_layers": 1,
    "attention_bias": False,
    "mlp_bias": False,
    "norm_bias": False,
    "decoder_bias": False,
}
FB_SECONDS = {1: 0.1, 2: 0.25, 3: 0.45, 4: 0.7}  # not linear: the total identifies the depths that ran


def tiny_module(layers: int = 4, **kwargs) -> MaskedLanguageModel:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=1e-3))
    return MaskedLanguageModel(backbone="modernbert", config={**TINY, "num_hidden_layers": layers},
                               vocab_size=100, pad_token_id=0, seq_len=16, **kwargs)


def logits(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


# -- the crammed model -----------------------------------------------------------------------------


def crammed_config() -> dict:
    recipe = yaml.safe_load((REPO_ROOT / "configs" / "bert" / "crammed.yaml").read_text())
    init = recipe["model"]["init_args"]
    assert init["backbone"] == "modernbert"
    return dict(init["config"])


def test_crammed_model_has_bert_c5_parameter_counts():
    with torch.device("meta"):
        model, family = build_masked_lm("modernbert", crammed_config() | {"vocab_size": 32768})
    assert isinstance(model, ModernBertForMaskedLM) and model.config._attn_implementation == "sdpa"
    assert sum(p.numel() for p in model.parameters()) == 120_153_600
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    assert len(per_layer) == 16 and per_layer[1:] == [5_899_776] * 15
    assert per_layer[0] == 5_899_776 - 768  # layer 0 has no attention LayerNorm
    assert sum(p.numel() for p in model.head.parameters()) == 590_592  # the head transform bert-c5 lacks
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    assert set(model.config.layer_types) == {"full_attention"}
    assert max_sequence_length(model.config, family) == 128


def test_crammed_model_signature_is_the_ntng_profiles():
    with torch.device("meta"):
        module = MaskedLanguageModel(backbone="modernbert", config=crammed_config(), vocab_size=32768,
                                     pad_token_id=0, seq_len=128)
    for name in ("ntng-bert-rtx3090.yaml", "ntng-bert-rtx3090-as-published.yaml"):
        profile = yaml.safe_load((REPO_ROOT / "configs" / "rst" / name).read_text())
        assert module.model_signature() == profile["model"], name


# -- the head and the layers -----------------------------------------------------------------------


def test_sparse_head_loss_equals_the_dense_loss():
    batch = mlm_batch()
    sparse, dense = tiny_module(sparse_prediction=True), tiny_module(sparse_prediction=False)
    sparse.eval(), dense.eval()
    with torch.no_grad():
        loss = sparse.loss(batch)
        torch.testing.assert_close(loss, dense.loss(batch))
        # ... and transformers' own loss (its own sparse_prediction off: dense over all positions).
        torch.testing.assert_close(loss, sparse.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
        selected, targets = masked_lm_logits(sparse.model, sparse.family, batch["input_ids"], batch["labels"])
        full, _ = masked_lm_logits(sparse.model, sparse.family, batch["input_ids"], None)
    torch.testing.assert_close(selected, full[batch["labels"] != -100])
    assert torch.equal(targets, batch["labels"][batch["labels"] != -100])
    assert sum(p.numel() for p in sparse.prediction_head.parameters()) == 32 * 32 + 32 + 100 * 32


def test_pretraining_dropout_reaches_modernbert_attention():
    module = MaskedLanguageModel(backbone="modernbert", config={**TINY, "attention_dropout": 0.1}, vocab_size=100,
                                 pad_token_id=0, seq_len=16, pretraining_dropout=0.0)
    assert {layer.attn.attention_dropout for layer in module.model.model.layers} == {0.0}
    assert module.model.config.attention_dropout == 0.1  # the export keeps the fine-tuning value


def test_layer_subsets_match_a_model_of_those_layers():
    module = tiny_module()
    model, adapter = module.model, module.layers
    assert adapter.family == "modernbert" and adapter.traits.exact_residual_scaling
    assert adapter.traits.always_active == ()
    ids = mlm_batch()["input_ids"]
    full = logits(model, ids)
    # Layers 0 and 2 run like a 2-layer model holding them (layer 2 keeps its attention norm).
    with adapter.active([0, 2]):
        subset = logits(model, ids)
        assert len(model(input_ids=ids, output_hidden_states=True).hidden_states) == 3
    reference = ModernBertForMaskedLM(truncated_model(model, 2).config).eval()
    state = {k: v for k, v in model.state_dict().items() if ".layers.1." not in k and ".layers.3." not in k}
    state = {k.replace(".layers.2.", ".layers.1."): v for k, v in state.items()}
    reference.load_state_dict(state)  # strict: layers 1 and 2 both have an attention norm
    torch.testing.assert_close(subset, logits(reference, ids))
    # Without layer 0, layer 1 reads the embedding norm's output through its own attention norm.
    with adapter.active([1, 3]):
        assert torch.isfinite(logits(model, ids)).all()
    torch.testing.assert_close(logits(model, ids), full)  # all active again: the full model
    # Pre-LN: scaling a layer's residual function by 0 is dropping it.
    adapter.set_output_scales({1: 0.0, 3: 0.0})
    scaled_out = logits(model, ids)
    adapter.set_output_scales(None)
    with adapter.active([0, 2]):
        torch.testing.assert_close(scaled_out, logits(model, ids))


def test_inactive_layers_get_no_gradient_and_truncation_exports_the_prefix(tmp_path):
    module = tiny_module()
    module.layers.set_active_layers([0, 1])
    module.loss(mlm_batch()).backward()
    for index, layer in enumerate(module.model.model.layers):
        grads = [p.grad for p in layer.parameters()]
        assert all(g is not None for g in grads) if index < 2 else all(g is None for g in grads)
    ids = mlm_batch()["input_ids"]
    expected = logits(module.model, ids)
    pruned = truncated_model(module.model, 2)
    assert pruned.config.num_hidden_layers == 2 and pruned.config.layer_types == ["full_attention"] * 2
    pruned.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert len(loaded.model.layers) == 2
    torch.testing.assert_close(logits(loaded, ids), expected)


def test_copy_layer_copies_everything_the_two_layers_share():
    adapter = tiny_module().layers
    with torch.no_grad():
        for layer in adapter.layers():
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
    adapter.copy_layer(1, 3)
    source, target = dict(adapter.layers()[1].named_parameters()), dict(adapter.layers()[3].named_parameters())
    assert source.keys() == target.keys()
    assert all(torch.equal(p, source[n]) and p is not source[n] for n, p in target.items())
    # Layer 0 has no attention norm: copying from it leaves the destination's own.
    own_norm = adapter.layers()[2].attn_norm.weight.clone()
    adapter.copy_layer(0, 2)
    zero, two = dict(adapter.layers()[0].named_parameters()), dict(adapter.layers()[2].named_parameters())
    assert set(two) - set(zero) == {"attn_norm.weight"}
    assert all(torch.equal(two[n], p) for n, p in zero.items())
    assert torch.equal(adapter.layers()[2].attn_norm.weight, own_norm)


# -- budgeted fits ---------------------------------------------------------------------------------


class DepthRecorder(Callback):
    """The active depth of every training micro-batch (after the method's hook has set it)."""

    def __init__(self) -> None:
        self.depths: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.depths.append(pl_module.layers.active_depth()["encoder"])


def budgeted_fit(tmp_path: Path, method: Callback, module: MaskedLanguageModel, budget_seconds: float):
    profile = write_profile(tmp_path / "profile.yaml", FB_SECONDS, layers={"encoder": 4}, family="modernbert")
    budget = ReferenceTimeBudget(budget=budget_seconds / 3600.0, profile=str(profile))
    recorder = DepthRecorder()
    trainer = fit_tiny(module, [budget, method, recorder], tmp_path, max_steps=-1, max_epochs=-1,
                       accumulate_grad_batches=2, enable_checkpointing=False)
    return trainer, recorder


def test_layer_drop_fit_is_charged_at_the_depth_that_ran(tmp_path):
    module = tiny_module()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer, recorder = budgeted_fit(tmp_path, ProgressiveLayerDrop(theta_bar=0.3, gamma_f=20.0, seed=1,
                                                                    scale_outputs=True), module, 8.0)
    assert trainer.global_step >= 4 and len(set(recorder.depths)) >= 2
    assert module.clock.rst_seconds == pytest.approx(sum(FB_SECONDS[d] for d in recorder.depths))
    assert module.clock.passes["forward_backward"] == len(recorder.depths) == 2 * trainer.global_step
    assert module.layers.all_active() and module.layers.output_scales() == {}
    assert all(not torch.equal(p, before[n]) for n, p in module.named_parameters() if "layers.0." in n)


def test_stacking_fit_grows_and_exports_the_grown_depth(tmp_path):
    module = tiny_module()
    stacking = LayerStacking(initial_layers=1, growth_fractions=[0.25, 0.95])
    trainer, recorder = budgeted_fit(tmp_path, stacking, module, 6.0)
    depths = recorder.depths[::2]
    assert depths[0] == 1 and 2 in depths and 4 not in depths  # the budget ends before the last growth
    assert module.clock.rst_seconds == pytest.approx(sum(FB_SECONDS[d] for d in recorder.depths))
    assert module.model_depth == 2
    module.export_pretrained(tmp_path / "hf")
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert exported.config.num_hidden_layers == 2 and exported.config.model_type == "modernbert"
    ids = mlm_batch()["input_ids"]
    torch.testing.assert_close(logits(exported, ids), logits(module.model, ids))


def test_export_round_trip_and_continue_from_checkpoint(tmp_path):
    module = tiny_module()
    module.export_pretrained(tmp_path / "hf")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert type(loaded) is ModernBertForMaskedLM
    ids = mlm_batch()["input_ids"]
    torch.testing.assert_close(logits(loaded, ids), logits(module.model, ids))
    again = MaskedLanguageModel(checkpoint=str(tmp_path / "hf"), vocab_size=100, pad_token_id=0, seq_len=16)
    assert again.family.decoder_attribute == "decoder" and again.model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(again.model, ids), logits(module.model, ids))


# -- fine-tuning -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny exported ModernBERT (2 layers, hidden 32) with its tokenizer."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = MaskedLanguageModel(backbone="modernbert", config={**TINY, "num_hidden_layers": 2,
                                                               "max_position_embeddings": MAX_LENGTH},
                                vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return model.export_pretrained(tmp_path_factory.mktemp("tiny-modernbert"), tokenizer)


def test_classification_and_multiple_choice_heads(tmp_path, checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    spec = get_task("glue", "rte")
    module = FineTuner(spec, checkpoint)
    assert module.model.config.model_type == "modernbert" and module._drop_token_types
    data = TaskDataModule(spec, write_glue(tmp_path), tokenizer, max_length=MAX_LENGTH, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    loss = module.loss(module(batch), batch["labels"])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in module.model.named_parameters()
                                        if ".layers." in n)

    spec = choice_spec(CHOICE_EXAMPLES)
    module = FineTuner(spec, checkpoint)
    assert type(module.model).__name__ == "ModernBertForMultipleChoice"
    data = TaskDataModule(spec, ".", tokenizer, max_length=MAX_LENGTH, batch_size=3)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()[0]))
    scores = module(batch)
    assert scores.shape == (3, 3) and torch.isinf(scores[~batch["candidate_mask"]]).all()
    module.loss(scores, batch["labels"]).backward()
    module.eval()
    with torch.no_grad():  # a candidate's score does not depend on its batch's padding
        alone = module(CandidateCollator(tokenizer.pad_token_id)(data.encode(CHOICE_EXAMPLES[:1])))
        padded = module(batch)
    torch.testing.assert_close(alone[0], padded[0, :2], atol=1e-5, rtol=1e-5)


def test_ntng_finetune_runs_on_a_modernbert_export(tmp_path, checkpoint, capsys):
    glue, superglue, output = write_glue(tmp_path / "glue"), write_superglue(tmp_path / "sg"), tmp_path / "out"
    common = ["--max-epochs", "1", "--batch-size", "4", "--max-length", str(MAX_LENGTH)]
    code, _, err = run_cli(["finetune", "--model", str(checkpoint), "--suite", "glue", "--tasks", "rte,stsb",
                            "--data-dir", str(glue), "--output", str(output / "glue"), *common], capsys)
    assert code == 0, err
    assert set(json.loads((output / "glue" / "results.json").read_text())["tasks"]) == {"rte", "stsb"}
    code, _, err = run_cli(["finetune", "--model", str(checkpoint), "--suite", "superglue", "--tasks", "copa",
                            "--data-dir", str(superglue), "--output", str(output / "sg"), *common], capsys)
    assert code == 0, err
    assert set(json.loads((output / "sg" / "results.json").read_text())["tasks"]) == {"copa"}

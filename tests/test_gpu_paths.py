"""The opt-in paths meant for GPUs, checked for correctness on the CPU: bf16 autocast, fused AdamW,
``torch.compile`` per layer (under layer drop: one graph per layer, whatever the active set) and SDPA."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from app.modules.masked_lm import MaskedLanguageModel
from callbacks.layer_drop import ProgressiveLayerDrop
from tests.conftest import fit_tiny, tiny_masked_lm
from tests.test_t5 import t5_batch, tiny_t5


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_bf16_autocast_trains_with_fp32_weights_and_a_finite_loss(tmp_path):
    module, losses = tiny_masked_lm(), Losses()
    fit_tiny(module, [losses], tmp_path, max_steps=6, precision="bf16-mixed")
    assert len(losses.losses) == 6 and all(torch.isfinite(torch.tensor(losses.losses)))
    assert all(p.dtype == torch.float32 for p in module.parameters())  # autocast: the weights stay fp32
    assert module.clock is None or module.clock.optimizer_steps == 6


def test_fused_adamw_takes_the_steps_of_the_plain_one(tmp_path):
    runs = {}
    for fused in (False, True):
        module = tiny_masked_lm(optimizer=lambda params, fused=fused: torch.optim.AdamW(params, lr=1e-3, fused=fused))
        fit_tiny(module, [], tmp_path / str(fused), max_steps=4)
        runs[fused] = weights(module)
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_compiled_layers_train_like_eager_ones_with_one_graph_per_layer_under_layer_drop(tmp_path):
    torch._dynamo.reset()
    runs = {}
    for backend in (None, "aot_eager"):  # aot_eager: dynamo's graphs and autograd, no C++ toolchain needed
        module = tiny_masked_lm(layers=4, compile_layers=backend)
        drop = ProgressiveLayerDrop(theta_bar=0.5, gamma_f=10.0, seed=0)
        fit_tiny(module, [drop], tmp_path / str(backend), max_steps=6)
        runs[backend] = weights(module)
        if backend is not None:
            assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in module.layers.layers())
    for key, value in runs[None].items():
        torch.testing.assert_close(runs["aot_eager"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # Layer drop ran sets of different sizes, yet each layer kept its one graph (plus its backward).
    frames = torch._dynamo.utils.counters["frames"]
    assert 0 < frames["ok"] <= 4 * 2, dict(frames)


@pytest.mark.slow  # tracing T5's blocks: about 8 s
def test_compiled_t5_blocks_match_eager_ones():
    torch._dynamo.reset()
    batch = t5_batch()
    eager, compiled = tiny_t5(), tiny_t5(compile_layers="aot_eager")
    compiled.setup("validate")  # compilation happens in setup, as in a fit
    torch.testing.assert_close(compiled.loss(batch), eager.loss(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", ["bert", "roberta-prelayernorm", "modernbert"])
def test_attention_runs_on_sdpa(backbone):
    module = MaskedLanguageModel(backbone=backbone, config={"num_hidden_layers": 1, "hidden_size": 32,
                                                            "num_attention_heads": 2, "intermediate_size": 64},
                                 vocab_size=100, pad_token_id=0, seq_len=16)
    assert module.model.config._attn_implementation == "sdpa"
    assert tiny_t5().model.config._attn_implementation == "sdpa"


@pytest.mark.slow  # two budgeted fits, one compiled
def test_compiled_layers_grow_like_eager_ones_under_stacking(tmp_path):
    from callbacks.stacking import LayerStacking
    from tests.test_stacking import fit as stacking_fit
    from tests.test_stacking import tiny_module

    torch._dynamo.reset()
    runs = {}
    for backend in (None, "aot_eager"):
        torch.manual_seed(0)
        module = tiny_module()
        module.compile_layers = backend  # as the constructor argument would set it
        stacking = LayerStacking(initial_layers=1, growth_fractions=[0.25, 0.5])
        _, module, recorder, _ = stacking_fit(tmp_path / str(backend), stacking, module=module)
        runs[backend] = (recorder.depths, weights(module))
        compiled = [hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in module.layers.layers()]
        assert compiled == [backend is not None] * 4
    assert runs[None][0] == runs["aot_eager"][0] == [1] * 6 + [2] * 3 + [4] * 3  # the same growth
    for key, value in runs[None][1].items():
        torch.testing.assert_close(runs["aot_eager"][1][key], value, rtol=1e-4, atol=1e-5, msg=key)

"""The hand-written optimizers against hand computations and against pytorch_optimizer's Lion."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pytorch_optimizer import Lion

from app.model import optimizers
from app.model.optimizers import AdamWScale, RMSScaledLion, SophiaG


def _param(*values: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _set_grad(param: torch.Tensor, *values: float) -> None:
    param.grad = torch.tensor(values, dtype=param.dtype)


def _two_groups(params: list[torch.Tensor], split: int = 1) -> list[dict]:
    # The layout of app.model.param_groups.weight_decay_groups: the second group overrides weight_decay.
    return [{"params": params[:split]}, {"params": params[split:], "weight_decay": 0.0}]


def test_sophiag_step_matches_hand_computation():
    param = _param(1.0, -2.0)
    opt = SophiaG([param], lr=0.1, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, bs=10)
    _set_grad(param, 4.0, 0.1)  # the sampled-label gradient
    opt.update_hessian()
    hessian = [0.01 * 16.0, 0.01 * 0.01]
    assert opt.state[param]["hessian"].tolist() == pytest.approx(hessian)

    _set_grad(param, 0.5, -0.3)
    opt.step()
    exp_avg = [0.035 * 0.5, 0.035 * -0.3]
    threshold = [0.04 * 10 * h for h in hessian]  # [0.064, 4e-5]
    # Coordinate 0: |m| = 0.0175 < 0.064, a preconditioned step; coordinate 1 is clipped to lr.
    expected = [
        1.0 * 0.99 - 0.1 * exp_avg[0] / (threshold[0] + 1e-15),
        -2.0 * 0.99 + 0.1 * 1.0,
    ]
    assert param.tolist() == pytest.approx(expected, abs=1e-12)
    assert opt.state[param]["exp_avg"].tolist() == pytest.approx(exp_avg)
    assert opt.state[param]["step"] == 1
    assert opt.win_rate == 0.5


def test_sophiag_zero_hessian_takes_lion_sized_step():
    param = _param(0.0, 0.0)
    opt = SophiaG([param], lr=0.1, weight_decay=0.0)
    _set_grad(param, 1e-6, -1e-6)
    opt.step()
    assert param.tolist() == pytest.approx([-0.1, 0.1])
    assert opt.win_rate == 0.0


def test_sophiag_bs_is_a_group_option():
    param = _param(1.0)
    opt = SophiaG([param], lr=0.1, rho=1.0, weight_decay=0.0, bs=1)
    opt.update_hessian([torch.tensor([100.0], dtype=torch.float64)])  # h = 1
    for group in opt.param_groups:
        group["bs"] = 1000
    _set_grad(param, 1.0)
    opt.step()
    m = 1.0 - 0.965
    assert param.item() == pytest.approx(1.0 - 0.1 * m / 1000.0)


def test_update_hessian_estimates_match_grads_and_skip_missing():
    first, second, unused = _param(1.0, 2.0), _param(3.0), _param(4.0)
    from_grads = SophiaG(_two_groups([first, second, unused], split=2))
    _set_grad(first, 0.5, -1.5)
    _set_grad(second, 2.0)
    from_grads.update_hessian()
    from_grads.update_hessian()

    copies = [_param(1.0, 2.0), _param(3.0), _param(4.0)]
    explicit = SophiaG(_two_groups(copies, split=2))
    estimates = [first.grad**2, second.grad**2, None]
    explicit.update_hessian(estimates)
    explicit.update_hessian(estimates)

    for original, clone in zip((first, second), copies):
        torch.testing.assert_close(
            from_grads.state[original]["hessian"], explicit.state[clone]["hessian"]
        )
    expected = (1 - 0.99**2) * first.grad**2  # two EMA updates from zero
    torch.testing.assert_close(from_grads.state[first]["hessian"], expected)
    assert unused not in from_grads.state and copies[2] not in explicit.state
    with pytest.raises(ValueError, match="expected 3 estimates"):
        explicit.update_hessian(estimates[:2])


def test_sophiag_rms_scaling():
    big, small = _param(3.0, -4.0), _param(1e-5, 0.0)
    opt = SophiaG([big, small], lr=0.1, weight_decay=0.1, rms_scaling=True)
    _set_grad(big, 1.0, 1.0)
    _set_grad(small, 1.0, 1.0)
    opt.step()  # h = 0: every coordinate takes the clipped step lr_eff * sign(m)
    rms = math.sqrt((2.97**2 + 3.96**2) / 2)  # of the decayed parameter, as NTNG's T5 code
    assert big.tolist() == pytest.approx([2.97 - 0.1 * rms, -3.96 - 0.1 * rms])
    assert small.tolist() == pytest.approx([0.99e-5 - 0.1 * 1e-3, -0.1 * 1e-3])  # RMS floor


@pytest.mark.parametrize("correct_bias", [True, False])
def test_adamwscale_step_matches_hand_computation(correct_bias):
    param = _param(3.0, -4.0)
    lr, eps, wd = 0.01, 1e-6, 0.1
    opt = AdamWScale([param], lr=lr, eps=eps, weight_decay=wd, correct_bias=correct_bias)
    grad = [1.0, -2.0]
    _set_grad(param, *grad)
    opt.step()
    rms = math.sqrt((9.0 + 16.0) / 2)  # before the update, as nanoT5
    alpha = lr * math.sqrt(1 - 0.999) / (1 - 0.9) if correct_bias else lr
    expected = []
    for p, g in zip([3.0, -4.0], grad):
        m, v = 0.1 * g, 0.001 * g * g
        updated = p - alpha * rms * m / (math.sqrt(v) + eps)
        expected.append(updated * (1 - lr * wd))  # decay after the Adam step
    assert param.tolist() == pytest.approx(expected, abs=1e-12)


def _adamwscale_reference_step(param, state, lr, betas, eps, weight_decay):
    """nanoT5's per-parameter AdamWScale update, written out (the docstring's formulas)."""
    state["step"] = state.get("step", 0) + 1
    m = state.setdefault("exp_avg", torch.zeros_like(param))
    v = state.setdefault("exp_avg_sq", torch.zeros_like(param))
    m.mul_(betas[0]).add_(param.grad, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(param.grad, param.grad, value=1 - betas[1])
    alpha = lr * (1 - betas[1] ** state["step"]) ** 0.5 / (1 - betas[0] ** state["step"])
    rms = (param.norm(2) / param.numel() ** 0.5).clamp(min=1e-3)
    param.sub_(alpha * rms * m / (v.sqrt() + eps))
    param.mul_(1 - lr * weight_decay)


@pytest.mark.parametrize("chunk_elements", [1 << 16, 8])  # one run of tensors; runs cut as on a CPU cache
def test_adamwscale_foreach_step_matches_the_per_parameter_update_when_parameters_skip_steps(
        chunk_elements, monkeypatch):
    monkeypatch.setattr(optimizers, "_CPU_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    shapes = [(8, 4), (4,), (3, 5, 2), (1,)]
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    ours[3].data.zero_()  # the RMS floor
    reference = [p.detach().clone() for p in ours]
    states = [{} for _ in ours]
    groups = [{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}]
    opt = AdamWScale(groups, lr=0.02, betas=(0.9, 0.99), eps=1e-6)
    for step in range(6):
        for i, (a, b) in enumerate(zip(ours, reference)):
            skipped = i == 1 and step % 2 == 0  # a dropped layer's parameter: no gradient, no step
            a.grad = None if skipped else torch.randn_like(a)
            b.grad = None if skipped else a.grad.clone()
        opt.step()
        for i, b in enumerate(reference):
            if b.grad is not None:
                _adamwscale_reference_step(b, states[i], 0.02, (0.9, 0.99), 1e-6, 0.1 if i < 2 else 0.0)
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
    assert [opt.state[p]["step"] for p in ours] == [6, 3, 6, 6]


def test_rms_scaled_lion_matches_hand_computation():
    param = _param(3.0, -4.0)
    opt = RMSScaledLion([param], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    _set_grad(param, 1.0, 2.0)
    opt.step()
    _set_grad(param, -3.0, 0.5)
    opt.step()
    # Step 1: m = 0, so c = 0.1 * g.
    lr_eff = 0.01 * math.sqrt(12.5)
    p = [x * (1 - lr_eff * 0.1) - lr_eff * 1.0 for x in (3.0, -4.0)]
    m = [0.01 * 1.0, 0.01 * 2.0]
    # Step 2: c = 0.9 * m + 0.1 * g = [-0.291, 0.068].
    lr_eff = 0.01 * math.sqrt((p[0] ** 2 + p[1] ** 2) / 2)
    expected = [p[0] * (1 - lr_eff * 0.1) + lr_eff, p[1] * (1 - lr_eff * 0.1) - lr_eff]
    assert param.tolist() == pytest.approx(expected, abs=1e-12)
    assert opt.state[param]["exp_avg"].tolist() == pytest.approx(
        [0.99 * m[0] + 0.01 * -3.0, 0.99 * m[1] + 0.01 * 0.5]
    )


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_without_scaling_matches_pytorch_optimizer(foreach):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = {"lr": 0.01, "betas": (0.95, 0.98), "weight_decay": 0.2}
    opt_ours = RMSScaledLion(_two_groups(ours), rms_scaling=False, **kwargs)
    opt_theirs = Lion(_two_groups(theirs), weight_decouple=True, foreach=foreach, **kwargs)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)


_FACTORIES = {
    "sophiag": lambda groups: SophiaG(groups, lr=0.1, weight_decay=0.5),
    "adamwscale": lambda groups: AdamWScale(groups, lr=0.1, weight_decay=0.5),
    "lion": lambda groups: RMSScaledLion(groups, lr=0.1, weight_decay=0.5, rms_scaling=False),
}


@pytest.mark.parametrize("name", sorted(_FACTORIES))
def test_second_group_is_not_decayed(name):
    decayed, exempt = _param(1.0, -1.0), _param(1.0, -1.0)
    opt = _FACTORIES[name](_two_groups([decayed, exempt]))
    for param in (decayed, exempt):
        param.grad = torch.zeros_like(param)  # zero momentum, so only decay can move a parameter
    opt.step()
    assert exempt.tolist() == [1.0, -1.0]
    assert decayed.tolist() == pytest.approx([0.95, -0.95])


@pytest.mark.parametrize("name", sorted(_FACTORIES))
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    first = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt = _FACTORIES[name](_two_groups(first))
    grads = [[torch.randn_like(p) for p in first] for _ in range(3)]
    for step_grads in grads[:2]:
        for p, g in zip(first, step_grads):
            p.grad = g.clone()
        if isinstance(opt, SophiaG):
            opt.update_hessian()
            opt.param_groups[0]["bs"] = 77
        opt.step()
    for a, b in zip(first, second):
        b.data.copy_(a.data)
    restored = _FACTORIES[name](_two_groups(second))
    # Deep-copied as a checkpoint file would be; load_state_dict keeps same-dtype tensors shared.
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    if isinstance(opt, SophiaG):
        assert restored.param_groups[0]["bs"] == 77
    for p, q, g in zip(first, second, grads[2]):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    restored.step()
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("decay_norm_weights", [False, True])
def test_norm_weights_are_not_decayed_unless_ntng_parity_asks(decay_norm_weights):
    from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM

    from app.model.param_groups import weight_decay_groups

    model = RobertaPreLayerNormForMaskedLM(RobertaPreLayerNormConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    decayed, undecayed = ({id(p) for p in group["params"]} for group in weight_decay_groups(model, decay_norm_weights))
    norms = [m.weight for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all((id(w) in decayed) == decay_norm_weights for w in norms)
    assert all(id(p) in undecayed for n, p in model.named_parameters() if n.endswith("bias"))

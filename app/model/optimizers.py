"""Optimizers that NTNG used and no maintained library provides.

They are written here because no maintained package has Sophia-G or nanoT5's ``AdamWScale``:
``pytorch_optimizer`` 4.1.0 has ``Lion`` (the recipes use it for plain Lion) and ``SophiaH`` only.

* ``SophiaG``: Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
  Model Pre-training" (arXiv 2305.14342); follows ``sophia.py`` of github.com/Liuhong99/Sophia (MIT)
  as vendored by NTNG (``bert/cramming/backend/optimizers/sophiag.py``, ``t5/t5/utils/sophia.py``).
* ``AdamWScale``: nanoT5's AdamW (github.com/PiotrNawrot/nanoT5) whose step is multiplied by
  ``max(1e-3, RMS(p))`` as in Adafactor; NTNG's T5 baseline.
* ``RMSScaledLion``: NTNG's T5 Lion (``t5/t5/utils/lion.py``, after lucidrains/lion-pytorch) with the
  same RMS scaling.

Every class is a plain ``torch.optim.Optimizer`` whose options are all per-group, so LightningCLI
``class_path``/``init_args`` and the two param groups of ``app.model.param_groups.weight_decay_groups`` (the second
with ``weight_decay=0.0``) work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

_MIN_RMS = 1e-3  # Adafactor's floor, so that zero-initialised tensors still move


def _step_size(lr: float, param: torch.Tensor, rms_scaling: bool) -> float | torch.Tensor:
    """``lr * max(1e-3, RMS(param))`` if ``rms_scaling`` else ``lr``.

    The scale stays a 0-dim tensor so that no step forces a device-to-host sync.
    """
    if not rms_scaling:
        return lr
    rms = param.norm(2) / param.numel() ** 0.5
    return lr * rms.clamp(min=_MIN_RMS)


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _validate(betas: tuple[float, float], **non_negative: float) -> None:
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")
    negative = [name for name, value in non_negative.items() if value < 0.0]
    if negative:
        raise ValueError(f"{', '.join(negative)} must be >= 0")


class _PerParameterOptimizer(Optimizer):
    """The step loop the three optimizers share: run the closure, update each parameter with a grad."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, param.grad, self.state[param], group)
        return loss

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError


class SophiaG(_PerParameterOptimizer):
    """Sophia with the Gauss-Newton-Bartlett Hessian estimate (clipped, preconditioned sign step).

    Per step, for every parameter with a gradient ``g``::

        p *= 1 - lr * weight_decay
        m  = b1 * m + (1 - b1) * g
        p -= lr_eff * sign(m) * min(|m| / (rho * bs * h + eps), 1)

    with ``lr_eff = lr * max(1e-3, RMS(p))`` (RMS after the decay, as NTNG's T5 code) if
    ``rms_scaling`` else ``lr``. ``h`` changes only in :meth:`update_hessian`, which the training
    loop calls every k steps after a backward on labels sampled from the model. ``bs`` is the
    number of loss tokens in that Hessian batch (the ``B`` of the GNB estimate ``B * g_hat**2``); it
    is a group option so the caller can set it per batch.

    Pitfall: a parameter whose ``h`` is still 0 (no gradient in any Hessian pass, e.g. layers that
    were dropped or not yet stacked) takes the fully clipped step ``lr * sign(m)``, i.e. Lion at
    Sophia's larger lr. Refresh ``h`` after growing a model.

    Attributes:
        win_rate: fraction of the last step's coordinates with ``|m| < rho * bs * h`` (not
            clipped); the Sophia README advises tuning ``rho`` to keep it in 0.1-0.5.

    Args:
        params: parameters or param groups.
        lr: learning rate (the paper's ``rho * eta``).
        betas: EMA decay of the gradient and of the Hessian estimate.
        rho: clipping scale ``gamma`` of the paper.
        weight_decay: decoupled weight decay, scaled by ``lr``.
        eps: keeps the ratio finite where ``h`` is 0.
        bs: tokens per Hessian batch.
        rms_scaling: multiply the step by ``max(1e-3, RMS(p))`` (NTNG's T5 runs).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        bs: int = 5120,
        rms_scaling: bool = False,
    ) -> None:
        _validate(betas, lr=lr, rho=rho, weight_decay=weight_decay, eps=eps)
        if bs <= 0:
            raise ValueError(f"bs must be > 0, got {bs}")
        defaults = {"lr": lr, "betas": tuple(betas), "rho": rho, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "eps": eps, "bs": bs, "rms_scaling": rms_scaling})
        self.win_rate = float("nan")

    def _state(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["hessian"] = torch.zeros_like(param)
        return state

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[torch.Tensor | None] | None = None) -> None:
        """Fold a diagonal Hessian estimate into ``h = b2 * h + (1 - b2) * e``.

        Args:
            estimates: one tensor (or ``None`` to skip) per parameter, in the order
                ``[p for g in param_groups for p in g["params"]]``. If omitted, ``e = p.grad**2``
                from the gradients of the sampled-label backward; parameters without a gradient
                keep their ``h``.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        if estimates is not None and len(estimates) != len(params):
            raise ValueError(f"expected {len(params)} estimates, got {len(estimates)}")
        index = 0
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for param in group["params"]:
                if estimates is not None:
                    estimate = estimates[index]
                else:
                    estimate = None if param.grad is None else param.grad * param.grad
                index += 1
                if estimate is not None:
                    self._state(param)["hessian"].mul_(beta2).add_(estimate, alpha=1.0 - beta2)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Sophia-G update; also sets ``win_rate``.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        # Summed as tensors and read once, so the step costs one device-to-host sync, not one per
        # parameter.
        self._not_clipped: int | torch.Tensor = 0
        self._total = 0
        loss = super().step(closure)
        if self._total:
            self.win_rate = float(self._not_clipped) / self._total
        return loss

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state = self._state(param)
        state["step"] += 1
        exp_avg, hessian = state["exp_avg"], state["hessian"]
        param.mul_(1.0 - group["lr"] * group["weight_decay"])
        exp_avg.mul_(group["betas"][0]).add_(grad, alpha=1.0 - group["betas"][0])
        magnitude, threshold = exp_avg.abs(), group["rho"] * group["bs"] * hessian
        ratio = (magnitude / (threshold + group["eps"])).clamp(max=1.0)
        step_size = _step_size(group["lr"], param, group["rms_scaling"])
        param.sub_(exp_avg.sign().mul_(ratio).mul_(step_size))
        self._not_clipped = self._not_clipped + (magnitude < threshold).sum()
        self._total += param.numel()


_CPU_CHUNK_ELEMENTS = 1 << 16  # p, grad, m, v and a temporary of this many fp32 values fit a core's L2


def _chunks(params: list[torch.Tensor], max_elements: int | None) -> list[list[torch.Tensor]]:
    """``params`` in runs of at most ``max_elements`` values (a larger tensor alone); one run if None.

    A GPU wants one ``_foreach`` call per operation over every tensor (launches are the cost). A CPU
    runs ``_foreach`` as a loop of per-tensor kernels, each sweeping its tensors through memory: six
    sweeps over all of T5-efficient-tiny's 97 tensors were 35 % slower than eight per-tensor ops whose
    operands stay in cache, so there the runs are cut to what a core's cache holds.
    """
    if max_elements is None:
        return [params]
    chunks, current, size = [], [], 0
    for param in params:
        if current and size + param.numel() > max_elements:
            chunks.append(current)
            current, size = [], 0
        current.append(param)
        size += param.numel()
    return chunks + [current] if current else chunks


class AdamWScale(Optimizer):
    """nanoT5's AdamW with an Adafactor-style relative step.

    Per step, for every parameter with a gradient ``g`` (``t`` counts its steps)::

        m  = b1 * m + (1 - b1) * g
        v  = b2 * v + (1 - b2) * g**2
        a  = lr * sqrt(1 - b2**t) / (1 - b1**t)     # a = lr if not correct_bias
        p -= a * max(1e-3, RMS(p)) * m / (sqrt(v) + eps)
        p *= 1 - lr * weight_decay                   # after the Adam step, with the unscaled lr

    This is nanoT5's order (HF's old ``AdamW``): ``eps`` is added to the uncorrected ``sqrt(v)`` and
    the decay acts on the already-updated ``p``, unlike ``torch.optim.AdamW``.

    Args:
        params: parameters or param groups.
        lr: base learning rate (nanoT5/NTNG T5: 2e-2).
        betas: EMA decays of the first and second moments.
        eps: added to ``sqrt(v)``.
        weight_decay: decoupled weight decay, scaled by ``lr`` (nanoT5: 0).
        correct_bias: apply Adam's bias correction.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        _validate(betas, lr=lr, eps=eps, weight_decay=weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "correct_bias": correct_bias})
        self._root_sizes: dict[tuple[int, ...], torch.Tensor] = {}  # per run of parameters, on their device

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient, in ``torch._foreach_*`` calls.

        Parameters that share a group, a step count, a device and a dtype update together: one
        call per operation for the lot instead of eight per parameter (a T5-base step has 280
        parameters; the per-parameter loop cost about 3 ms of Python per step on T5 tiny).

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = _closure_loss(closure)
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1  # per parameter: a dropped layer's parameters skip steps
                buckets.setdefault((state["step"], param.device, param.dtype), []).append(param)
            for (step, device, _), params in buckets.items():
                for chunk in _chunks(params, None if device.type == "cuda" else _CPU_CHUNK_ELEMENTS):
                    self._update_bucket(chunk, step, group)
        return loss

    def _update_bucket(self, params: list[torch.Tensor], step: int, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        lr = group["lr"]
        if group["correct_bias"]:
            lr = lr * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
        # lr * max(1e-3, RMS(p)) per parameter, as 0-dim tensors: no device-to-host sync.
        norms = torch.stack(torch._foreach_norm(params))
        key = tuple(id(p) for p in params)
        if key not in self._root_sizes:  # made once: a host-to-GPU copy every step would sync the GPU
            self._root_sizes[key] = torch.tensor([p.numel() ** 0.5 for p in params], dtype=norms.dtype,
                                                 device=norms.device)
        root_sizes = self._root_sizes[key]
        negative_steps = (norms / root_sizes).clamp_(min=_MIN_RMS).mul_(-lr).unbind()
        # p += m / ((sqrt(v) + eps) / -step): one temporary list, as torch.optim.AdamW's foreach path.
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_div_(denominators, negative_steps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])


class RMSScaledLion(_PerParameterOptimizer):
    """Lion with NTNG's T5 relative step size.

    Per step, for every parameter with a gradient ``g``::

        lr_eff = lr * max(1e-3, RMS(p))    # lr if not rms_scaling; RMS before the decay
        p     *= 1 - lr_eff * weight_decay # NTNG decays with the scaled lr too
        p     -= lr_eff * sign(b1 * m + (1 - b1) * g)
        m      = b2 * m + (1 - b2) * g

    With ``rms_scaling=False`` this is ``pytorch_optimizer.Lion(weight_decouple=True)``, which the
    recipes use for plain Lion.

    Args:
        params: parameters or param groups.
        lr: learning rate (NTNG T5: 7.5e-4).
        betas: interpolation weight for the update and EMA decay of the momentum.
        weight_decay: decoupled weight decay, scaled by ``lr_eff`` (NTNG T5: 0).
        rms_scaling: multiply the lr by ``max(1e-3, RMS(p))``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        rms_scaling: bool = True,
    ) -> None:
        _validate(betas, lr=lr, weight_decay=weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "rms_scaling": rms_scaling})

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["exp_avg"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"]
        step_size = _step_size(group["lr"], param, group["rms_scaling"])
        param.mul_(1.0 - step_size * group["weight_decay"])
        param.sub_(exp_avg.lerp(grad, 1.0 - beta1).sign_().mul_(step_size))
        exp_avg.lerp_(grad, 1.0 - beta2)

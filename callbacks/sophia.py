"""Sophia-G's Hessian refresh: a functional core and a callback that also prices an update for ``ntng plan``.

Functional core: :func:`refresh_hessian` (accumulate the GNB gradient over a Hessian batch,
all-reduce it across ranks, fold it into the optimizer's EMA), usable without a Trainer.
:class:`SophiaHessian` is the thin callback that decides when and on which micro-batches.
The optimizers themselves live in ``app.model.optimizers`` (SophiaG) and ``pytorch_optimizer`` (Lion).
"""

from __future__ import annotations

from collections import deque
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from app.accounting.planning import PlanSettings, UpdateCost, baseline_update_cost
from app.errors import ConfigurationError
from app.modules.budgeted import require_budgeted_module
from callbacks.sampling import multi_process


def refresh_hessian(
    module: Any,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, torch.Tensor]],
    charge: bool = True,
    clip_norm: float | None = None,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> int:
    """One Sophia-G Hessian refresh: ``h <- b2 h + (1 - b2) g_hat**2`` from a whole Hessian batch.

    The parameters' ``.grad`` are stashed and set to None, ``module.hessian_pass`` runs on every
    micro-batch (summed GNB loss; gradients accumulate), the sums are all-reduced (SUM) across ranks
    when ``torch.distributed`` is initialised (the pass bypasses DDP's reducer), then divided by the
    Hessian batch's total loss tokens over all ranks, so ``g_hat`` is the gradient of the mean GNB
    loss over every loss token of the batch. Every group's ``bs`` is set to that token count (the
    ``B`` of ``B * g_hat**2``), ``optimizer.update_hessian()`` folds ``g_hat**2`` in, and the stashed
    gradients are put back exactly as they were.

    Args:
        module: has ``hessian_pass(batch, charge) -> int`` (``MaskedLanguageModel``).
        optimizer: has ``update_hessian()`` and per-group ``bs`` (``app.model.optimizers.SophiaG``).
        batches: the Hessian batch's micro-batches on this rank.
        charge: pay each pass on the module's clock (False: NTNG's "free Hessian" ablation).
        clip_norm: clip ``g_hat`` to this global norm before squaring (Sophia's script, NTNG T5: 1.0).
        context: entered around the passes (the trainer's autocast context).

    Returns:
        Loss tokens of the Hessian batch summed over ranks (0: nothing was estimated).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stashed = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        tokens = 0
        with torch.enable_grad(), context():
            for batch in batches:
                tokens += module.hessian_pass(batch, charge)
        grads = [p.grad for p in params if p.grad is not None]
        if multi_process():
            device = grads[0].device if grads else params[0].device
            total = torch.tensor(float(tokens), device=device, dtype=torch.float64)
            dist.all_reduce(total)
            tokens = int(total.item())
            for grad in grads:  # every rank has the same graph, so the same grads exist everywhere
                dist.all_reduce(grad)
        if tokens > 0:
            for grad in grads:
                grad.div_(tokens)
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip_norm)
            for group in optimizer.param_groups:
                group["bs"] = tokens
            optimizer.update_hessian()
        return tokens
    finally:
        for p, grad in zip(params, stashed):
            p.grad = grad


class SophiaHessian(Callback):
    """Sophia-G's Gauss-Newton-Bartlett (GNB) Hessian refresh every k optimizer updates.

    Paper: Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training", 2023, arXiv 2305.14342 (code: github.com/Liuhong99/Sophia). The
    optimizer (``app.model.optimizers.SophiaG``) takes a clipped, preconditioned sign step
    ``lr * sign(m) * min(|m| / (rho * bs * h + eps), 1)``; this callback keeps ``h`` up to date with
    the GNB estimate ``B * g_hat**2``, where ``g_hat`` is the gradient of the mean cross-entropy on
    labels *sampled from the model* over a Hessian batch of ``B`` loss tokens.

    What NTNG did (Kaddour et al. 2023, BERT): every 10 updates (also at update 0) it took the next
    768 sequences (6 micro-batches of 128) of *training data*, sampled labels with
    ``Categorical(logits=...)``, backpropagated the CE on them accumulated over the 6 micro-batches,
    then ``update_hessian()``; each Hessian micro-batch was charged as a full forward+backward
    (``free_updates=True`` made them free), ``bs = 128 * 1536`` counted every token. Its ``logits``
    were the flattened *encoder hidden states* (sparse prediction returns them), so labels were drawn
    from a softmax over 768 hidden units at every token: not the MLM Gauss-Newton diagonal, and the
    prediction head got no Hessian signal. We do not copy that bug.

    What we do (``MaskedLanguageModel.hessian_pass``): sample labels from the *vocabulary* logits
    at the positions that carry the MLM loss only, sum the CE, accumulate over the Hessian batch's
    micro-batches (and DDP ranks), divide by its loss tokens, and set every group's ``bs`` to that
    count (not every token: with 15 % masking NTNG's ``bs`` rescaled rho by about 6.7x).

    Choices where the sources differ or a callback constrains us:

    * Which data: a callback cannot fetch extra batches, so the Hessian batch is the last
      ``hessian_micro_batches`` training micro-batches seen (detached references to the masked
      batches from ``on_train_batch_start``), i.e. the update's own micro-batches when
      ``accumulate_grad_batches >= hessian_micro_batches``. NTNG (and Sophia's script) consumed
      fresh training data instead. The GNB estimator samples its labels from the model, so the data
      only supplies inputs; reusing them costs no training data and changes little. Fewer micro-batches
      than asked may exist early in a run (accumulation below ``hessian_micro_batches``): those
      that exist are used and charged.
    * When: in ``on_before_optimizer_step`` of every update whose index (``trainer.global_step``
      before it) is a multiple of k, so update 0 gets a Hessian before it is taken, as NTNG's "also
      at update 0", instead of a blind ``lr * sign(m)`` step with ``h = 0``. The refresh uses the
      parameters before the update (Sophia's script: after the previous one: the same point). Its
      passes are charged before the update's optimizer step and before the budget decides to stop,
      so the clock never misses them whatever the callback order.
    * Gradients: at that point ``.grad`` holds the update's (DDP-reduced, AMP-unscaled) gradient.
      It is stashed, the passes run from ``None`` grads, and it is put back untouched (the same
      tensor objects, so DDP bucket views survive) before clipping and the step.
    * DDP: the passes call the module directly, outside DDP's forward, so its reducer is not
      involved; :func:`refresh_hessian` all-reduces the summed gradients and token counts itself.
    * Depth: the passes run at the active depth the last micro-batch left (charged at that depth).
      With layer dropping or stacking, parameters of inactive layers keep their old ``h`` (0 at
      first: a Lion-like step at Sophia's lr); NTNG never combined them.
    * Precision: the passes run in the trainer's autocast context (BF16 recommended; NTNG found
      FP16 unstable, and the GNB backward is not loss-scaled).
    * Resume: the refresh count and every rank's kept micro-batches are saved (gathered into the one
      callback state Lightning keeps), so a resumed run's next refresh sees the batches an
      uninterrupted run's would, also when accumulation is below ``hessian_micro_batches``.

    Choosing ρ. NTNG's tuned ρ = 0.01 (BERT) does not carry over: its BERT Hessian pass sampled labels
    from hidden states, summed six mean-loss backwards (h ≈ 36·(∇ℓ̄)²) and set bs = 196,608 (every
    token of 128 × 1,536), while ours is the GNB estimate with bs = the loss tokens, so the same ρ clips
    in another regime. Sophia's README tunes ρ so that the share of coordinates not clipped (the
    win rate) stays in 0.1-0.5; the callback watches the logged win rate and warns once, with the
    direction to move ρ (a larger ρ clips less), when its mean over ``win_rate_window`` updates stays
    outside ``win_rate_range``. A short run of the recipe with the overlay is a ρ calibration.

    Logs ``method/hessian_updates`` (refreshes so far) at every refresh and ``optimizer/win_rate``
    (share of coordinates not clipped; Sophia's README tunes rho to keep it in 0.1-0.5) after every
    update when the optimizer exposes ``win_rate``.

    Args:
        every_n_steps: k, updates between refreshes (Sophia, NTNG: 10).
        hessian_micro_batches: micro-batches per Hessian batch (NTNG BERT: 6 x 128 = 768 sequences;
            NTNG T5: one full batch).
        charge: charge each Hessian micro-batch as a forward+backward pass; False is NTNG's
            ``free_updates`` ablation.
        clip_norm: clip ``g_hat`` to this global norm (Sophia's script: grad_clip 1.0; NTNG T5:
            1.0; NTNG BERT: none).
        win_rate_range: the win rates Sophia's README aims for; outside them a warning says so.
        win_rate_window: updates whose mean win rate is compared with ``win_rate_range``.
    """

    # Strategy kind -> why it is refused (app.modules.strategies.check_strategy_support; docs/strategies.md).
    unsupported_strategies: ClassVar[dict[str, str]] = {
        "fsdp": "its Hessian passes run the module directly, outside FSDP's wrapper (sharded parameters are "
                "not gathered there), and it all-reduces whole .grad tensors itself",
        "deepspeed": "its Hessian passes back-propagate outside the DeepSpeed engine and read .grad, which ZeRO "
                     "stage 2/3 reduces into partitions, and DeepSpeed wraps the optimizer, so SophiaG's "
                     "update_hessian and per-parameter state are not the ones the engine steps",
    }

    def __init__(
        self,
        every_n_steps: int = 10,
        hessian_micro_batches: int = 6,
        charge: bool = True,
        clip_norm: float | None = None,
        win_rate_range: tuple[float, float] = (0.1, 0.5),
        win_rate_window: int = 50,
    ) -> None:
        if every_n_steps < 1:
            raise ConfigurationError(f"SophiaHessian: every_n_steps must be >= 1, got {every_n_steps}")
        if hessian_micro_batches < 1:
            raise ConfigurationError(
                f"SophiaHessian: hessian_micro_batches must be >= 1, got {hessian_micro_batches}"
            )
        if clip_norm is not None and clip_norm <= 0:
            raise ConfigurationError(f"SophiaHessian: clip_norm must be > 0, got {clip_norm}")
        self.every_n_steps, self.hessian_micro_batches = every_n_steps, hessian_micro_batches
        self.charge, self.clip_norm = charge, clip_norm
        low, high = win_rate_range
        if not 0.0 <= low < high <= 1.0 or win_rate_window < 1:
            raise ConfigurationError(f"SophiaHessian: win_rate_range must be 0 <= low < high <= 1 and win_rate_window "
                                     f">= 1, got {win_rate_range} and {win_rate_window}")
        self.win_rate_range, self.win_rate_window = (low, high), win_rate_window
        self._win_rates: deque[float] = deque(maxlen=win_rate_window)
        self._warned_win_rate = False
        self.hessian_updates = 0
        self._kept: deque[dict[str, torch.Tensor]] = deque(maxlen=hessian_micro_batches)
        self._refreshed_at: int | None = None
        self._saved_kept: list[list[dict[str, Any]]] | None = None  # every rank's, from a checkpoint

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Optimizers exist from here on (``setup`` runs before ``configure_optimizers``).
        for optimizer in trainer.optimizers:
            if not callable(getattr(optimizer, "update_hessian", None)):
                raise ConfigurationError(
                    f"SophiaHessian needs an optimizer with update_hessian() (app.model.optimizers.SophiaG), "
                    f"got {type(optimizer).__name__}"
                )
        require_budgeted_module(pl_module, "SophiaHessian", needs=("hessian_pass",))
        if trainer.precision in ("16-mixed", "16"):
            rank_zero_warn("SophiaHessian: the GNB backward is not loss-scaled; NTNG found FP16 unstable, use bf16-mixed")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._kept.append({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or self._refreshed_at == step or not self._kept:
            return
        self._refreshed_at = step  # once per update, even if a step is retried
        tokens = refresh_hessian(
            pl_module, optimizer, list(self._kept), self.charge, self.clip_norm,
            context=trainer.precision_plugin.train_step_context,
        )
        if tokens:
            self.hessian_updates += 1
        pl_module.log_update("method/hessian_updates", float(self.hessian_updates))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        win_rate = getattr(trainer.optimizers[0], "win_rate", None)
        if callable(win_rate):
            win_rate = win_rate()
        if win_rate is not None and win_rate == win_rate:  # not NaN (no step yet)
            pl_module.log_update("optimizer/win_rate", float(win_rate))
            self._check_win_rate(float(win_rate))

    def _check_win_rate(self, win_rate: float) -> None:
        self._win_rates.append(win_rate)
        if self._warned_win_rate or len(self._win_rates) < self.win_rate_window:
            return
        mean, (low, high) = sum(self._win_rates) / len(self._win_rates), self.win_rate_range
        if not low <= mean <= high:
            self._warned_win_rate = True
            move = "raise" if mean < low else "lower"
            rank_zero_warn(f"SophiaHessian: SophiaG's win rate averaged {mean:.3f} over the last {len(self._win_rates)} "
                           f"updates, outside Sophia's {low}-{high}; {move} rho (NTNG's 0.01 was tuned for another "
                           "Hessian estimate and bs, see the SophiaHessian docstring)")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._kept.clear()

    def expected_update_cost(self, settings: PlanSettings, progress: float, update: int = 0) -> UpdateCost:
        """The baseline update (priced with the recipe's optimizer, SophiaG) plus, on every k-th update
        (update 0 included), a Hessian batch of forward+backward micro-batches at full depth: the last
        ``hessian_micro_batches`` seen, fewer while fewer exist. NTNG BERT: +6 micro-batches every 10
        updates of 12, +5 %. Hessian passes are not trained on, so micro-batches and tokens are the
        baseline's; with ``charge: false`` they cost nothing.

        Don't double count: NTNG's T5 A100 profile prices SophiaG at +0.125 s/step, which already
        amortises its Hessian batch; with such a profile plan with ``charge: false`` (a warning says so).
        """
        if not self.charge or update % self.every_n_steps:
            return baseline_update_cost(settings)
        profile = settings.profile
        priced = getattr(profile, "optimizer_step_seconds", {}).get(settings.optimizer, 0.0)
        if priced > 0:
            rank_zero_warn(
                f"profile {profile.name!r} prices {settings.optimizer} at +{priced:g} s/step, which may already "
                "amortise the Hessian batch (NTNG T5 does); plan with charge: false not to count it twice"
            )
        passes = min(self.hessian_micro_batches, (update + 1) * settings.micro_batches)
        per_micro = profile.seconds("forward_backward", settings.micro_batch_tokens, dict(settings.layers))
        return baseline_update_cost(settings, extra_seconds=passes * per_micro)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._saved_kept is None:
            return
        if len(self._saved_kept) != trainer.world_size:
            raise ConfigurationError(f"SophiaHessian: the checkpoint holds the kept micro-batches of "
                                     f"{len(self._saved_kept)} rank(s) but this run has {trainer.world_size}")
        device = pl_module.device
        self._kept.clear()
        self._kept.extend({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                          for batch in self._saved_kept[trainer.global_rank])
        self._saved_kept = None

    def state_dict(self) -> dict[str, Any]:
        kept = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in self._kept]
        ranks = [kept]
        if multi_process():  # Lightning keeps rank 0's callback state only
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, kept)
        return {"hessian_updates": self.hessian_updates, "kept": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.hessian_updates = int(state_dict["hessian_updates"])
        self._saved_kept = state_dict.get("kept")

"""Cost models: what one pass costs in seconds on the *reference* machine.

Reference system time (RST, NTNG §2) charges every pass a cost measured once on a named reference
machine, so budgets are comparable across hardware and methods. A cost model answers
``seconds(pass_kind, tokens, active_layers)``:

* ``RSTProfile``: a measured table, loaded from YAML (``configs/rst/*.yaml``), written by
  ``ntng calibrate`` or transcribed from NTNG's published tables. Seconds are given per pass kind
  as a table keyed by active depth (used when every stack has that depth) and as a linear fit
  ``fixed + sum_stack per_layer[stack] * layers[stack]`` (used for any other depth), both for
  ``reference_tokens`` tokens and scaled linearly with the tokens of the pass.
* ``AnalyticFlops``: the fallback when no profile exists: 2 FLOPs per parameter per token forward,
  6 forward+backward, over the active layers and the always-run parts, at a declared throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from app.errors import ConfigurationError
from app.shipped import shipped_path

PASS_KINDS: tuple[str, ...] = ("forward", "forward_backward")
SIGNATURE_FIELDS: tuple[str, ...] = ("family", "layers", "hidden", "heads", "ffn", "vocab", "seq_len")


@dataclass
class PassCost:
    """Measured seconds of one pass kind at ``reference_tokens`` tokens.

    Attributes:
        table: seconds keyed by active depth (the same depth in every stack).
        fixed: intercept of the linear fit (embeddings, head, launch overheads).
        per_layer: slope of the linear fit per stack, seconds per active layer.
    """

    table: dict[int, float] = field(default_factory=dict)
    fixed: float = 0.0
    per_layer: dict[str, float] = field(default_factory=dict)

    def seconds(self, active_layers: Mapping[str, int]) -> float:
        depths = set(active_layers.values())
        if len(depths) == 1 and (depth := depths.pop()) in self.table:
            return self.table[depth]
        missing = set(active_layers) - set(self.per_layer)
        if missing:
            raise ConfigurationError(f"profile has no per-layer cost for stack(s) {sorted(missing)}")
        return self.fixed + sum(self.per_layer[s] * n for s, n in active_layers.items())


@dataclass
class RSTProfile:
    """A reference-machine cost table with provenance (see the module docstring).

    Attributes:
        name: short identifier, shown in logs.
        reference_tokens: tokens of the timed unit the seconds refer to (micro-batch or step).
        passes: cost per pass kind.
        optimizer_step_seconds: extra seconds per optimizer step by optimizer class name, beyond
            what the pass costs already include (0 where the table was timed with that optimizer).
        model: the model signature the profile was measured for.
        provenance: device, precision, software, date, source; free-form.
        layer_parameter_share: share of the trainable parameters in one layer, per stack. An
            optimizer step at reduced depth updates only the parameters that had a gradient, so
            its cost is scaled by the share updated (``ntng calibrate`` measures it).
    """

    name: str
    reference_tokens: int
    passes: dict[str, PassCost]
    optimizer_step_seconds: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    layer_parameter_share: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "RSTProfile":
        """Read a profile YAML, with clear errors for missing or malformed fields.

        A relative path is looked up from the working directory, then from the ntng checkout, so
        recipes can name shipped profiles (``configs/rst/...``) from anywhere.
        """
        path = shipped_path(path)
        if not path.is_file():
            raise ConfigurationError(f"RST profile not found: {path}; give an existing profile (configs/rst/ ships "
                                     "some) or measure one for this model with `ntng calibrate -c <recipe> --output "
                                     f"{path}`")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            passes = {
                kind: PassCost(
                    table={int(k): float(v) for k, v in (spec.get("table") or {}).items()},
                    fixed=float(spec.get("fixed", 0.0)),
                    per_layer={s: float(v) for s, v in (spec.get("per_layer") or {}).items()},
                )
                for kind, spec in raw["passes"].items()
            }
            profile = cls(
                name=str(raw.get("name", path.stem)),
                reference_tokens=int(raw["reference_tokens"]),
                passes=passes,
                optimizer_step_seconds={k: float(v) for k, v in (raw.get("optimizer_step_seconds") or {}).items()},
                model=dict(raw.get("model") or {}),
                provenance=dict(raw.get("provenance") or {}),
                layer_parameter_share={k: float(v) for k, v in (raw.get("layer_parameter_share") or {}).items()},
            )
        except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as err:
            problem = (f"missing key {err}" if isinstance(err, KeyError) else
                       " ".join(str(err).split()) if isinstance(err, yaml.YAMLError) else f"{type(err).__name__}: {err}")
            raise ConfigurationError(f"malformed RST profile {path}: {problem}; a profile states passes (a table "
                                     "per pass kind) and reference_tokens: fix it, or re-make it with `ntng "
                                     "calibrate`") from err
        unknown = set(passes) - set(PASS_KINDS)
        if unknown or "forward_backward" not in passes:
            raise ConfigurationError(f"RST profile {path} needs pass kinds among {PASS_KINDS}, got {sorted(passes)}")
        return profile

    def to_yaml(self) -> str:
        """Serialise in the format ``load`` reads (tables sorted by depth)."""
        document = {
            "name": self.name,
            "provenance": self.provenance,
            "model": self.model,
            "reference_tokens": self.reference_tokens,
            "passes": {
                kind: {
                    "table": {d: round(s, 6) for d, s in sorted(cost.table.items())},
                    "fixed": round(cost.fixed, 6),
                    "per_layer": {s: round(v, 6) for s, v in cost.per_layer.items()},
                }
                for kind, cost in self.passes.items()
            },
            "optimizer_step_seconds": {k: round(v, 6) for k, v in self.optimizer_step_seconds.items()},
            "layer_parameter_share": {k: round(v, 6) for k, v in self.layer_parameter_share.items()},
        }
        return yaml.safe_dump(document, sort_keys=False)

    def seconds(self, kind: str, tokens: int, active_layers: Mapping[str, int]) -> float:
        """Reference seconds of one pass of ``kind`` over ``tokens`` tokens at the given depths."""
        if kind not in self.passes:
            raise ConfigurationError(f"RST profile {self.name!r} has no {kind!r} cost")
        return self.passes[kind].seconds(active_layers) * tokens / self.reference_tokens

    def optimizer_seconds(self, optimizer_name: str, active_layers: Mapping[str, float] | None = None) -> float:
        """Extra seconds per optimizer step (0 for optimizers the table already includes).

        Args:
            optimizer_name: the optimizer's class name.
            active_layers: (expected) active depth per stack; with ``layer_parameter_share`` the
                full-depth cost is scaled by the share of parameters a step at that depth updates.
        """
        seconds = self.optimizer_step_seconds.get(optimizer_name, 0.0)
        if active_layers is None or not self.layer_parameter_share:
            return seconds
        full = self.model.get("layers") or {}
        idle = sum(self.layer_parameter_share.get(s, 0.0) * (full.get(s, n) - n) for s, n in active_layers.items())
        return seconds * (1.0 - idle)

    def check_signature(self, signature: Mapping[str, Any], allow_mismatch: bool = False) -> list[str]:
        """Compare the profile's model signature with the run's.

        Args:
            signature: the run's signature (``model_signature``).
            allow_mismatch: return the differences instead of raising.

        Returns:
            Human-readable differences (empty when they match).

        Raises:
            ConfigurationError: on any difference unless ``allow_mismatch``.
        """
        differences = [
            f"{key}: profile {self.model[key]!r} vs run {signature.get(key)!r}"
            for key in SIGNATURE_FIELDS
            if key in self.model and self.model[key] != signature.get(key)
        ]
        if differences and not allow_mismatch:
            raise ConfigurationError(
                f"RST profile {self.name!r} was measured for another model ({'; '.join(differences)}); "
                "calibrate one for this model with `ntng calibrate`, or set budget.allow_profile_mismatch=true to "
                "price this model with it anyway"
            )
        return differences


@dataclass
class AnalyticFlops:
    """FLOP-based fallback: seconds = FLOPs / ``flops_per_second`` of a declared reference device.

    Forward costs ``2 * params * tokens`` and forward+backward ``6 * params * tokens`` over the
    active layers' parameters plus ``fixed_params`` (embeddings' projection head and other parts
    that always run). Attention's sequence-length-dependent term is ignored, which is accurate
    within a few percent for seq_len << 6 * hidden (BERT at 128 tokens).

    Attributes:
        layer_params: parameters of one layer, per stack.
        fixed_params: parameters outside the layer stacks that do matmul work every pass.
        flops_per_second: sustained throughput of the reference device.
    """

    layer_params: dict[str, int]
    fixed_params: int
    flops_per_second: float
    name: str = "analytic-flops"

    def flops(self, kind: str, tokens: int, active_layers: Mapping[str, int]) -> float:
        """FLOPs of one pass."""
        params = self.fixed_params + sum(self.layer_params[s] * n for s, n in active_layers.items())
        return (2.0 if kind == "forward" else 6.0) * params * tokens

    def seconds(self, kind: str, tokens: int, active_layers: Mapping[str, int]) -> float:
        return self.flops(kind, tokens, active_layers) / self.flops_per_second

    def optimizer_seconds(self, optimizer_name: str, active_layers: Mapping[str, float] | None = None) -> float:
        return 0.0


def fit_linear(table: Mapping[int, float]) -> tuple[float, float, float]:
    """Least-squares ``seconds = fixed + per_layer * depth`` over a depth table.

    Returns:
        ``(fixed, per_layer, worst relative residual)``.
    """
    depths, seconds = list(table), [table[d] for d in table]
    n = len(depths)
    if n == 1:
        return 0.0, seconds[0] / depths[0], 0.0
    mean_d, mean_s = sum(depths) / n, sum(seconds) / n
    slope = sum((d - mean_d) * (s - mean_s) for d, s in zip(depths, seconds)) / sum((d - mean_d) ** 2 for d in depths)
    intercept = mean_s - slope * mean_d
    worst = max(abs(intercept + slope * d - s) / s for d, s in zip(depths, seconds))
    return intercept, slope, worst

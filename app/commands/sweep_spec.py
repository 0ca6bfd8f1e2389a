"""What a sweep file says: a recipe, methods, budgets, seeds and fine-tuning suites, and the cells they make.

A sweep file (``configs/sweeps/*.yaml``)::

    name: quickstart
    recipe: configs/quickstart.yaml          # the model, data, optimizer and budget unit of every cell
    overrides: ["--trainer.limit_val_batches=4"]   # for every cell's fit
    budgets: [0.004, 0.008]                  # in the recipe's budget unit
    seeds: [0, 1]                            # pretraining seeds (seed_everything)
    methods:                                 # the baseline is a method like any other
      baseline: {}
      layer_drop: {overlays: [configs/methods/layer_drop.yaml], overrides: []}
    finetune:                                # zero or more suites, each on every cell's export
      - {suite: superglue, data_dir: datamodules/samples/superglue, tasks: [copa], epochs: 2, seeds: [0], args: []}
    validate_every_fraction: 0.125           # the validation curve the report's time-to-target reads
    checkpoint_every_fraction: 0.25          # where a killed cell resumes from
    branch_budgets: false                    # WSD cooldowns branched from the largest budget's run
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from app.errors import ConfigurationError
from app.shipped import SHIPPED_ROOT, shipped_path

SWEEP_KEYS = {"name", "recipe", "overrides", "budgets", "seeds", "methods", "finetune", "validate_every_fraction",
              "checkpoint_every_fraction", "branch_budgets"}
METHOD_KEYS = {"overlays", "overrides"}
FINETUNE_KEYS = {"suite", "data_dir", "tasks", "epochs", "seeds", "args"}
SUITES = ("glue", "superglue", "sni")  # sni: Super-Natural-Instructions, T5 checkpoints only


@dataclass(frozen=True)
class MethodSpec:
    """One method of a sweep.

    Attributes:
        name: the method's name (the baseline is ``baseline``); a directory name of the cells.
        overlays: recipe overlays applied after the recipe (``configs/methods/<name>.yaml``).
        overrides: ``--key value`` arguments for this method's fits.
    """

    name: str
    overlays: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class FinetuneSpec:
    """One fine-tuning suite run on every cell's export (``ntng finetune``).

    Attributes:
        suite: ``glue``, ``superglue`` or ``sni`` (T5 only).
        data_dir: the suite's data directory (or ``hub``).
        tasks: task names; empty means every task of the suite.
        epochs: epochs per task (None: the suite's default).
        seeds: fine-tuning seeds.
        args: further ``ntng finetune`` arguments.
    """

    suite: str
    data_dir: str | None = None
    tasks: tuple[str, ...] = ()
    epochs: int | None = None
    seeds: tuple[int, ...] = (0,)
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    """One (method, budget, seed) of a sweep."""

    method: MethodSpec
    budget: float
    seed: int

    @property
    def key(self) -> str:
        """``<method>/b<budget>/s<seed>``: the cell's directory under ``cells/``."""
        return f"{self.method.name}/b{self.budget:g}/s{self.seed}"

    def directory(self, root: Path) -> Path:
        return root / "cells" / self.key


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, checked sweep file (see the module docstring)."""

    name: str
    recipe: str
    methods: tuple[MethodSpec, ...]
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    finetune: tuple[FinetuneSpec, ...] = ()
    validate_every_fraction: float = 0.1
    checkpoint_every_fraction: float = 0.25
    branch_budgets: bool = False
    source: str = ""
    cells: tuple[Cell, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        cells = tuple(Cell(m, b, s) for m in self.methods for s in self.seeds for b in sorted(self.budgets))
        object.__setattr__(self, "cells", cells)

    def units(self) -> list[list[Cell]]:
        """What runs in order, one unit per SLURM array task: a cell, or with ``branch_budgets`` the
        cells of one (method, seed), largest budget first (the others branch from its checkpoints)."""
        if not self.branch_budgets:
            return [[cell] for cell in self.cells]
        units = []
        for method in self.methods:
            for seed in self.seeds:
                units.append([Cell(method, b, seed) for b in sorted(self.budgets, reverse=True)])
        return units

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        """Read and check a sweep file (paths inside it are found from here or from the checkout)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"sweep file not found: {path}; pass a sweep YAML with -c (configs/sweeps/ "
                                     "ships some)")
        where = f"sweep file {path}"
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigurationError(f"{where}: not valid YAML ({' '.join(str(err).split())}); fix the file") from None
        _check_keys(raw, SWEEP_KEYS, where)
        for key in ("recipe", "budgets", "seeds", "methods"):
            if not raw.get(key):
                raise ConfigurationError(f"{where}: `{key}` is required")
        if not isinstance(raw["methods"], dict):
            raise ConfigurationError(f"{where}: methods must be a mapping from method name to its settings, got "
                                     f"{raw['methods']!r}; write e.g. `methods: {{baseline: {{}}, layer_drop: "
                                     "{overlays: [configs/methods/layer_drop.yaml]}}`")
        methods = []
        for name, spec in raw["methods"].items():
            spec = spec or {}
            _check_keys(spec, METHOD_KEYS, f"{where}, method {name}")
            overlays = tuple(find_file(o, f"{where}, method {name}", _overlay_hint) for o in spec.get("overlays") or ())
            methods.append(MethodSpec(str(name), overlays, tuple(str(a) for a in spec.get("overrides") or ())))
        suites = []
        for spec in raw.get("finetune") or ():
            _check_keys(spec, FINETUNE_KEYS, f"{where}, finetune")
            if spec.get("suite") not in SUITES:
                raise ConfigurationError(f"{where}: finetune suite must be one of {', '.join(SUITES)}, "
                                         f"got {spec.get('suite')!r}")
            suites.append(FinetuneSpec(
                suite=spec["suite"], data_dir=spec.get("data_dir"), tasks=tuple(spec.get("tasks") or ()),
                epochs=spec.get("epochs"), seeds=tuple(spec.get("seeds") or (0,)),
                args=tuple(str(a) for a in spec.get("args") or ()),
            ))
        budgets = _numbers(raw["budgets"], float, f"{where}: budgets")
        if any(not b > 0 for b in budgets) or len(set(budgets)) != len(budgets):
            raise ConfigurationError(f"{where}: budgets must be positive and distinct, got {list(budgets)}; give "
                                     "each budget once, in the recipe's budget unit")
        seeds = _numbers(raw["seeds"], int, f"{where}: seeds")
        for key in ("validate_every_fraction", "checkpoint_every_fraction"):
            if key in raw and not 0 < _numbers([raw[key]], float, f"{where}: {key}")[0] <= 1:
                raise ConfigurationError(f"{where}: {key} must be in (0, 1], got {raw[key]}")
        return cls(
            name=str(raw.get("name", path.stem)), recipe=find_file(raw["recipe"], where), methods=tuple(methods),
            budgets=budgets, seeds=seeds,
            overrides=tuple(str(a) for a in raw.get("overrides") or ()), finetune=tuple(suites),
            validate_every_fraction=float(raw.get("validate_every_fraction", 0.1)),
            checkpoint_every_fraction=float(raw.get("checkpoint_every_fraction", 0.25)),
            branch_budgets=bool(raw.get("branch_budgets", False)), source=str(path),
        )


def find_file(name: str, where: str, hint: Callable[[], str] | None = None) -> str:
    """``name`` as given when it exists from here, else from the ntng checkout (shipped configs)."""
    path = shipped_path(name)
    if path.is_file():
        return str(path)
    raise ConfigurationError(f"{where}: file not found: {name}{hint() if hint else ''}")


def _overlay_hint() -> str:
    names = ", ".join(sorted(p.stem for p in (SHIPPED_ROOT / "configs" / "methods").glob("*.yaml")))
    return f"; give an overlay that exists: configs/methods/<name>.yaml ships {names} (T5: configs/t5/methods/)"


def _numbers(values: object, kind: type, where: str) -> tuple:
    """``values`` (a list) as numbers of ``kind``, or a ConfigurationError naming the bad one."""
    if not isinstance(values, list):
        raise ConfigurationError(f"{where}: expected a list of numbers, got {values!r}; write e.g. [0.001, 0.002]")
    numbers = []
    for value in values:
        try:
            if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            numbers.append(kind(value))
        except (TypeError, ValueError):
            raise ConfigurationError(f"{where}: {value!r} is not a{'n integer' if kind is int else ' number'}; "
                                     "give plain numbers (in the recipe's budget unit for budgets)") from None
    return tuple(numbers)


def _check_keys(raw: object, allowed: set[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{where}: expected a mapping, got {type(raw).__name__}")
    if unknown := sorted(set(raw) - allowed):
        raise ConfigurationError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")

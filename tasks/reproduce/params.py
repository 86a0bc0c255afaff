"""`reproduce/params.yaml` -> frozen pydantic models: the reproduction's one configuration.

The reproduction (reproduce/dvc.yaml, docs/reproduction.md) runs cells (profile, seed, pattern).
Its settings live here, not in command-line flags: `dvc exp run -S` varies them, and every cell
records the settings it ran with. Two profiles: `paper` (the authors' settings) and `tuned`
(the injection regime a CPU run needs, with the repair's stamp rate and epochs chosen on the
validation split by the `selection` stage: `rate: selected`, `epochs: selected`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from tasks.common.settings import (
    MODEL_NAMES,
    BatchSize,
    Betas,
    ConfigError,
    Count,
    Group,
    Momentum,
    Positive,
    Probability,
    as_tuple,
    describe_error,
    read_params_file,
)

PARAMS_FILE = Path("reproduce/params.yaml")
Pattern = Annotated[int, Field(ge=0, le=50)]
Ints = Annotated[tuple[Pattern, ...], BeforeValidator(as_tuple), Field(min_length=1)]
Seeds = Annotated[tuple[Annotated[int, Field(ge=0)], ...], BeforeValidator(as_tuple),
                  Field(min_length=1)]
Rates = Annotated[tuple[Probability, ...], BeforeValidator(as_tuple), Field(min_length=1)]
Selected = Literal["selected"]


class DataSettings(Group):
    """The data and the three-way split of the test set."""

    archive: str = Field(description="CIFAR-10 archive; 'auto' = the project's default source")
    split_seed: int = Field(ge=0, description="seed of the one fit / validation / eval split")
    n_defender: int = Field(ge=2, description="test images the defender holds (fit + val)")
    n_validation: int = Field(ge=1, description="of which held for every choice")


class ModelSettings(Group):
    """The clean model each seed starts from (trained on the 50,000 training images)."""

    arch: Literal[MODEL_NAMES]  # type: ignore[valid-type]
    width: Count
    epochs: Count
    batch_size: BatchSize
    lr: Positive


class GridSettings(Group):
    """Which cells exist: canonical pattern indices and seeds, per role."""

    seeds: Seeds = Field(description="report seeds of the tuned profile")
    patterns: Ints = Field(description="report patterns of the tuned profile")
    paper_seeds: Seeds
    paper_patterns: Ints
    tuning_seeds: Seeds = Field(description="seeds of the selection cells (never reported)")
    tuning_patterns: Ints
    clean_seeds: Seeds = Field(description="every seed above once: one clean model each")
    target: int = Field(ge=0, le=9)

    @model_validator(mode="after")
    def _disjoint(self) -> GridSettings:
        shared = set(self.tuning_seeds) & (set(self.seeds) | set(self.paper_seeds))
        if shared:
            raise ValueError(f"grid.tuning_seeds: must not be report seeds, got {sorted(shared)}")
        # A pattern the selection tuned on would be reported with a setting chosen for it.
        shared = set(self.tuning_patterns) & (set(self.patterns) | set(self.paper_patterns))
        if shared:
            raise ValueError(f"grid.tuning_patterns: must not be report patterns, got "
                             f"{sorted(shared)}")
        used = set(self.seeds) | set(self.paper_seeds) | set(self.tuning_seeds)
        if set(self.clean_seeds) != used or len(self.clean_seeds) != len(used):
            raise ValueError(f"grid.clean_seeds: must list each seed once, {sorted(used)}, "
                             f"got {list(self.clean_seeds)}")
        return self


class EvaluateSettings(Group):
    """Held-out variants measured besides the original trigger."""

    variants: int = Field(ge=0, description="nearest other canonical patterns")
    shifts: bool = Field(description="contrast / tint shifted copies too")


class InjectSettings(Group):
    """The authors' fine-tune injection (per-image probability, one place per batch)."""

    prob: Probability
    lr: Positive
    epochs: Count
    batch_size: BatchSize


class MesaSettings(Group):
    """MESA's fit (mesa_lib.mesa.MesaConfig)."""

    betas: Betas
    alpha: float = Field(ge=0)
    epochs: Count
    batch_size: BatchSize
    lr: Positive
    trigger_noise: float = Field(ge=0)


class PointSettings(Group):
    """The single-point baseline: K starts optimised in pixel space."""

    starts: Count
    epochs: Count
    lr: Positive


class CleanseSettings(Group):
    """Neural Cleanse for the known target: best mask by its own criterion."""

    epochs: Count
    patience: int = Field(ge=0)
    asr_threshold: Probability


class RepairSettings(Group):
    """Fine-tuning with sampled triggers and true labels; the same for every method."""

    rate: Probability | Selected
    epochs: Count | Selected
    lr: Positive
    momentum: Momentum
    weight_decay: float = Field(ge=0)
    augment: bool
    batch_size: BatchSize
    sample_noise: float = Field(ge=0, description="noise added to every sampler (0: none)")


class Profile(Group):
    """One column of the comparison: how the backdoor is planted and how it is repaired."""

    inject: InjectSettings
    mesa: MesaSettings
    point: PointSettings
    point_paper: PointSettings = Field(description="the point baseline at the paper's strength, "
                                                   "a row beside `point`")
    cleanse: CleanseSettings
    repair: RepairSettings


class SelectionSettings(Group):
    """The sweep on the validation split that fixes the tuned profile's repair."""

    rates: Rates
    checkpoints: Annotated[tuple[Count, ...], BeforeValidator(as_tuple), Field(min_length=1)]
    methods: Annotated[tuple[str, ...], BeforeValidator(as_tuple), Field(min_length=1)]
    max_accuracy_drop: Probability = Field(description="largest clean-accuracy loss allowed")


class ReproParams(Group):
    """The whole reproduce/params.yaml."""

    seed_offset: int = Field(ge=0, description="added to every cell seed (a fresh replicate)")
    data: DataSettings
    model: ModelSettings
    grid: GridSettings
    evaluate: EvaluateSettings
    selection: SelectionSettings
    profiles: dict[Literal["paper", "tuned"], Profile]

    @model_validator(mode="after")
    def _checks(self) -> ReproParams:
        if set(self.profiles) != {"paper", "tuned"}:
            raise ValueError(f"profiles: need paper and tuned, got {sorted(self.profiles)}")
        paper = self.profiles["paper"].repair
        if "selected" in (paper.rate, paper.epochs):
            raise ValueError("profiles.paper.repair: the paper's rate and epochs are fixed")
        if self.data.n_validation >= self.data.n_defender:
            raise ValueError("data.n_validation: must be < data.n_defender")
        if max(self.selection.checkpoints) < 1:
            raise ValueError("selection.checkpoints: need an epoch >= 1")
        return self

    def cells(self, profile: str) -> list[tuple[int, int]]:
        """(seed, pattern) of every cell of a profile ('select' = the tuning cells)."""
        g = self.grid
        seeds, patterns = {"tuned": (g.seeds, g.patterns),
                           "paper": (g.paper_seeds, g.paper_patterns),
                           "select": (g.tuning_seeds, g.tuning_patterns)}[profile]
        return [(s, p) for s in seeds for p in patterns]


def load_repro_params(path: Path | str = PARAMS_FILE) -> ReproParams:
    """Read and validate reproduce/params.yaml; a bad key is named with its value."""
    raw = read_params_file(path)
    try:
        return ReproParams.model_validate(raw)
    except ValidationError as err:
        lines = [describe_error(e) for e in err.errors(include_url=False)]
        raise ConfigError(f"{path}: invalid params:\n" + "\n".join(lines)) from None

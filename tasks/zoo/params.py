"""`zoo/params.yaml` -> frozen pydantic models: the model zoo the scanner is measured on.

Four kinds of entries, each one DVC stage of zoo/dvc.yaml (foreach): `bases` (clean models
trained from scratch), `clean_finetunes` (a base fine-tuned without poison: the control that
looks most like an injected model), `injections` (the authors' fine-tune injection into a base)
and `badnets` (BadNets poisoning, trained from scratch). Every entry belongs to the
`calibration` or the `test` zoo; the two may share no base model (checked here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from tasks.common.settings import (
    MODEL_NAMES,
    BatchSize,
    ConfigError,
    Count,
    Group,
    Positive,
    Probability,
    describe_error,
    read_yaml,
)

PARAMS_FILE = Path("zoo/params.yaml")
Zoo = Literal["calibration", "test"]


class DataSettings(Group):
    """Training subset and the test set's reference / truth split."""

    archive: str
    n_train: Count
    split_seed: int = Field(ge=0)
    n_reference: Count = Field(description="test images the scanner may use; the rest: truth")


class TrainSettings(Group):
    """SGD settings of a training run (from scratch, or a fine-tune)."""

    epochs: Count
    batch_size: BatchSize
    lr: Positive


class Base(Group):
    """A clean model trained from scratch."""

    zoo: Zoo
    arch: Literal[MODEL_NAMES]  # type: ignore[valid-type]
    seed: int = Field(ge=0)


class CleanFinetune(Group):
    """A base fine-tuned the same way as an injection, without poison."""

    zoo: Zoo
    base: str
    seed: int = Field(ge=0)


class Attack(Group):
    """The trigger and how it is planted."""

    zoo: Zoo
    seed: int = Field(ge=0)
    trigger: Literal["bw", "random_color"]
    size: int = Field(ge=1, le=32)
    location: str = Field(pattern=r"^(random|corner|\d+,\d+)$")
    rate: Probability
    target: int = Field(ge=0, le=9)
    alpha: float = Field(gt=0, le=1)


class Injection(Attack):
    """Fine-tune injection into a base (per-image probability `rate`)."""

    base: str


class Badnets(Attack):
    """BadNets poisoning (`rate` of the non-target images), trained from scratch."""

    arch: Literal[MODEL_NAMES]  # type: ignore[valid-type]


class ZooParams(Group):
    """The whole zoo/params.yaml."""

    data: DataSettings
    train: TrainSettings
    finetune: TrainSettings
    min_asr: Probability
    bases: dict[str, Base]
    clean_finetunes: dict[str, CleanFinetune]
    injections: dict[str, Injection]
    badnets: dict[str, Badnets]

    @model_validator(mode="after")
    def _checks(self) -> ZooParams:
        names = [*self.bases, *self.clean_finetunes, *self.injections, *self.badnets]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique across bases, clean_finetunes, "
                             "injections and badnets")
        for name, entry in {**self.clean_finetunes, **self.injections}.items():
            base = self.bases.get(entry.base)
            if base is None:
                raise ValueError(f"{name}.base: no base model {entry.base!r}")
            if base.zoo != entry.zoo:  # a shared base would leak calibration into the test
                raise ValueError(f"{name}.base: {entry.base} is in the {base.zoo} zoo, "
                                 f"{name} in the {entry.zoo} zoo")
        return self

    def entry(self, name: str) -> tuple[str, Base | CleanFinetune | Injection | Badnets]:
        """(kind, entry) of a model by name."""
        for kind in ("bases", "clean_finetunes", "injections", "badnets"):
            found = getattr(self, kind).get(name)
            if found is not None:
                return kind, found
        raise KeyError(f"{name}: not in {PARAMS_FILE}")

    def names(self, zoo: str | None = None) -> list[str]:
        """Every model name (of one zoo), in file order."""
        every = {**self.bases, **self.clean_finetunes, **self.injections, **self.badnets}
        return [n for n, e in every.items() if zoo is None or e.zoo == zoo]


def load_zoo_params(path: Path | str = PARAMS_FILE) -> ZooParams:
    """Read and validate zoo/params.yaml; a bad key is named with its value."""
    raw = read_yaml(path)
    try:
        return ZooParams.model_validate(raw)
    except ValidationError as err:
        lines = [describe_error(e) for e in err.errors(include_url=False)]
        raise ConfigError(f"{path}: invalid params:\n" + "\n".join(lines)) from None

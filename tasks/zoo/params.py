"""`zoo/params.yaml` -> frozen pydantic models: the model zoo the scanner is measured on.

Three kinds of entries, each one DVC stage of zoo/dvc.yaml (foreach): `bases` (clean models
trained from scratch), `clean_finetunes` (a base fine-tuned without poison: the control that
looks most like an injected model) and `backdoors`: each names an attack of mesa_lib.poison's
registry with its settings (checked against the attack's config), and is planted either into a
`base` while fine-tuning or into a new `arch` trained from scratch. Every entry belongs to the
`calibration` or the `test` zoo; the two may share no base model (checked here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator

from mesa_lib.models import FOREIGN_REGISTRIES, is_foreign
from mesa_lib.poison import attack_class, registered
from tasks.common import plugins
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


def _architecture(name: str) -> str:
    """Our own architectures, or `torchvision:<name>` / `timm:<name>`: the library builds it
    (mesa_lib.foreign), which names the spec if its registry has no such model."""
    if name in MODEL_NAMES or is_foreign(name):
        return name
    raise ValueError(f"unknown architecture {name!r}: one of {', '.join(MODEL_NAMES)} or "
                     f"<registry>:<name> of {', '.join(FOREIGN_REGISTRIES)}")


Architecture = Annotated[str, AfterValidator(_architecture)]


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
    arch: Architecture
    seed: int = Field(ge=0)


class CleanFinetune(Group):
    """A base fine-tuned the same way as an injection, without poison."""

    zoo: Zoo
    base: str
    seed: int = Field(ge=0)


class Backdoor(Group):
    """A backdoored model: an attack of the registry (its settings beside these keys), planted
    into a `base` while fine-tuning it or into a new `arch` trained from scratch."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    zoo: Zoo
    seed: int = Field(ge=0)
    target: int = Field(ge=0, le=9)
    attack: str = Field(description="a name of mesa_lib.poison.ATTACKS")
    base: str | None = None
    arch: Architecture | None = None
    also: dict[str, Any] | None = Field(
        default=None, description="a second trigger planted with the first: {attack, target, "
        "its settings}; the model then has two targets")

    @model_validator(mode="after")
    def _planted_once(self) -> Backdoor:
        if (self.base is None) == (self.arch is None):
            raise ValueError("give exactly one of base (fine-tune injection into a base model) "
                             "and arch (trained from scratch)")
        if self.also is not None:
            second = dict(self.also)
            if not isinstance(second.pop("attack", None), str) or \
                    second.pop("target", None) not in range(10):
                raise ValueError("also: needs 'attack' (a registry name) and 'target' (0-9)")
            if self.also["target"] == self.target:
                raise ValueError("also.target: the second trigger needs another target")
            plugins.build(attack_class(self.also["attack"]).config, second)
        return self

    @property
    def targets(self) -> list[int]:
        """Every target class: the first trigger's, then the second's."""
        return [self.target] + ([self.also["target"]] if self.also else [])

    @property
    def settings(self) -> dict[str, Any]:
        """The attack's settings (checked against its config when the file was read)."""
        return dict(self.model_extra or {})

    def attack_config(self) -> Any:
        """The attack's config dataclass."""
        return plugins.build(attack_class(self.attack).config, self.settings)

    def plants(self) -> list[tuple[str, Any, int]]:
        """(attack name, config, target) of every trigger, the first one first."""
        out = [(self.attack, self.attack_config(), self.target)]
        if self.also:
            settings = {k: v for k, v in self.also.items() if k not in ("attack", "target")}
            out.append((self.also["attack"],
                        plugins.build(attack_class(self.also["attack"]).config, settings),
                        self.also["target"]))
        return out


class ZooParams(Group):
    """The whole zoo/params.yaml."""

    data: DataSettings
    train: TrainSettings
    finetune: TrainSettings
    min_asr: Probability
    bases: dict[str, Base]
    clean_finetunes: dict[str, CleanFinetune]
    backdoors: dict[str, Backdoor]

    @model_validator(mode="after")
    def _checks(self) -> ZooParams:
        names = [*self.bases, *self.clean_finetunes, *self.backdoors]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique across bases, clean_finetunes and "
                             "backdoors")
        derived = {**self.clean_finetunes,
                   **{n: e for n, e in self.backdoors.items() if e.base is not None}}
        for name, entry in derived.items():
            base = self.bases.get(entry.base)
            if base is None:
                raise ValueError(f"{name}.base: no base model {entry.base!r}")
            if base.zoo != entry.zoo:  # a shared base would leak calibration into the test
                raise ValueError(f"{name}.base: {entry.base} is in the {base.zoo} zoo, "
                                 f"{name} in the {entry.zoo} zoo")
        return self

    def entry(self, name: str) -> tuple[str, Base | CleanFinetune | Backdoor]:
        """(kind, entry) of a model by name."""
        for kind in ("bases", "clean_finetunes", "backdoors"):
            found = getattr(self, kind).get(name)
            if found is not None:
                return kind, found
        raise KeyError(f"{name}: not in {PARAMS_FILE}")

    def names(self, zoo: str | None = None) -> list[str]:
        """Every model name (of one zoo), in file order."""
        every = {**self.bases, **self.clean_finetunes, **self.backdoors}
        return [n for n, e in every.items() if zoo is None or e.zoo == zoo]


def check_attacks(raw: Any) -> tuple[Any, list[str]]:
    """`raw` with each backdoor's attack settings checked against its attack's config (defaults
    filled in), and the problems found, each naming its key."""
    entries = raw.get("backdoors") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        return raw, []
    out, errors, attacks = {}, [], registered()
    for name, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("attack") not in attacks:
            out[name] = entry
            if isinstance(entry, dict):
                errors.append(f"backdoors.{name}.attack: unknown attack "
                              f"{entry.get('attack')!r}; known: {sorted(attacks)}")
            continue
        own = {k: v for k, v in entry.items() if k in Backdoor.model_fields}
        given = {k: v for k, v in entry.items() if k not in Backdoor.model_fields}
        settings, problems = plugins.check_block(attacks[entry["attack"]].config, given,
                                                 f"backdoors.{name}")
        out[name], errors = {**own, **settings}, errors + problems
    return {**raw, "backdoors": out}, errors


def load_zoo_params(path: Path | str = PARAMS_FILE) -> ZooParams:
    """Read and validate zoo/params.yaml; a bad key is named with its value."""
    raw, lines = check_attacks(read_yaml(path))
    if not lines:
        try:
            return ZooParams.model_validate(raw)
        except ValidationError as err:
            lines = [describe_error(e) for e in err.errors(include_url=False)]
    raise ConfigError(f"{path}: invalid params:\n" + "\n".join(lines))

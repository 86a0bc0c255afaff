"""`params.yaml` -> typed, frozen pydantic models, checked once before any work (STYLE habit 3).

Every key of `params.yaml` is required and every key is known (`extra="forbid"`); types are strict
(YAML `true` is not the number 1, `"0.1"` is not a float) and ranges and choices are declared on
the fields. A bad file raises `ConfigError` naming each offending key and value, e.g.
`recover.alpha: Input should be greater than or equal to 0, got -0.1`. DVC reads the same file
for its params deps, so `dvc exp run -S recover.alpha=0.2` and `dvc params diff` see exactly what
the stages use. The JSON schema of the file is `docs/params.schema.json`
(`python -m tasks.common.params schema`).

The model and trigger names are mirrored here (a test keeps them equal to the registries in
mesa_lib); the detectors' blocks are checked against the configs they registered
(tasks.common.plugins), which imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mesa_lib import detectors, poison
from tasks.common import plugins
from tasks.common.settings import (  # noqa: F401 - re-exported: the params API in one place
    MODEL_NAMES,
    OVERLAY_KEY,
    BatchSize,
    Betas,
    ConfigError,
    Count,
    Group,
    Momentum,
    Positive,
    Probability,
    Strings,
    as_tuple,
    describe_error,
    leaves,
    overlay_base,
    read_params_file,
    read_yaml,
)

PARAMS_FILE = Path("params.yaml")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


class BaseParams(Group):
    """Run-wide settings."""

    seed: int = Field(ge=0, description="seed of every random draw")
    device: str = Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto | cpu | cuda | cuda:N; auto picks CUDA when present")
    deterministic: bool = Field(description="torch.use_deterministic_algorithms (warn-only)")


class DataParams(Group):
    """Which raw data and how it is split."""

    name: Literal["cifar10", "cifar100"]
    archive: str = Field(description="file or folder inside data/, or 'auto' (the one there)")
    n_train: int = Field(ge=0, description="training images used, a seeded subset; 0 = all")
    n_defender: int = Field(ge=2, description="test images given to the defender; rest held out")


class ValidateParams(Group):
    """Tolerances of the Great Expectations gates."""

    class_balance: Probability = Field(description="per-class count within this share of N/K")
    poison_rate_tolerance: Probability = Field(description="|measured - configured| poison rate")
    data_docs: bool = Field(description="also render GX Data Docs HTML")


class PoisonParams(Group):
    """The attack: one of mesa_lib.poison's registry, with the settings of each it may plant."""

    attack: str = Field(description="which attack of `settings` is planted")
    target: int = Field(ge=0)
    settings: dict[str, dict[str, Any]] = Field(
        min_length=1, description="attack -> its settings (mesa_lib.poison registry; keys left "
                                  "out take the attack's defaults)")

    def __hash__(self) -> int:  # the settings blocks are dicts: hash the group as JSON
        return hash(json.dumps(self.model_dump(mode="json"), sort_keys=True))


class TrainParams(Group):
    """Training of the (backdoored) classifier."""

    model: Literal[MODEL_NAMES]  # type: ignore[valid-type]
    width: Count = Field(description="resnet8 width multiplier (ignored by other models)")
    epochs: Count = Field(description="badnets: training from scratch; injection: clean model")
    batch_size: BatchSize
    lr: Positive
    momentum: Momentum
    weight_decay: float = Field(ge=0)
    schedule: Literal["onecycle", "cosine", "constant"]
    warmup: float = Field(gt=0, lt=1)
    label_smoothing: float = Field(ge=0, lt=1)
    inject_epochs: int = Field(ge=0, description="finetune_injection: epochs with poison")
    inject_lr: Positive = Field(description="finetune_injection: constant SGD lr")


class RecoverParams(Group):
    """MESA: fitting the staircase of trigger generators (mesa_lib.mesa.MesaConfig)."""

    betas: Betas
    alpha: float = Field(ge=0)
    epochs: Count
    batch_size: BatchSize
    lr: Positive
    hidden: Count
    mine_hidden: Count
    trigger_noise: float = Field(ge=0)
    geometry: Literal["scan", "anywhere"] = Field(
        description="where MESA models the triggers: scan = each flagged target's recovered "
                    "geometry; anywhere = trigger_size squares at random places (the paper's)")
    trigger_size: int = Field(ge=1, le=32, description="side of the squares of `anywhere`")
    n_images: int = Field(ge=0, description="defender images used for fitting; 0 = all")
    grid_samples: int = Field(ge=1, le=1024, description="triggers drawn for the PNG grid")


class BaselineParams(Group):
    """The single-point baseline (mesa_lib.baselines.PointConfig) and its repair."""

    starts: Count = Field(description="random restarts; each gives one trigger")
    epochs: Count = Field(description="passes over the images while optimising the triggers")
    batch_size: BatchSize
    lr: Positive
    momentum: Momentum
    n_images: int = Field(ge=0, description="defender images used to optimise; 0 = all")
    repair_epochs: Count = Field(description="its repair's epochs (other settings: repair.*)")


class RepairParams(Group):
    """Fine-tuning the model against sampled triggers (labels kept true)."""

    epochs: Count
    batch_size: BatchSize
    lr: Positive
    momentum: Momentum
    weight_decay: float = Field(ge=0)
    rate: Probability = Field(description="share of each batch stamped with a sampled trigger")
    augment: bool
    method: Literal["mesa", "unlearn", "finetune", "random"] = Field(
        description="what a scan's repair stamps (mesa_lib.defence): MESA over the recovered "
                    "geometry, or a control")
    max_residual: Probability = Field(
        description="highest ASR a recovered trigger may keep after a repair")
    max_accuracy_drop: Probability = Field(description="largest clean-accuracy loss allowed")
    min_rescan_p: Probability = Field(
        description="smallest p-value the re-scan of a repaired model may give")
    rounds: Count = Field(description="most repair rounds: after each, the classes that still "
                                      "stand out get their triggers recovered anew")
    again_p: Probability = Field(description="between rounds, a class whose re-scan p-value is "
                                             "below this stands out even when not flagged")
    recheck: bool = Field(default=False, description="between rounds, every target repaired so "
                          "far stands out too, whatever the re-scan says")
    verification: Probability = Field(
        description="share of the reference images the scan did not use kept to verify")
    selection: Probability = Field(
        description="share of them where triggers are recovered and their geometry measured")

    @model_validator(mode="after")
    def _parts(self) -> RepairParams:
        if self.verification + self.selection >= 1:
            raise ValueError("repair.verification + repair.selection must leave images to "
                             f"repair on, got {self.verification} + {self.selection}")
        return self


class EvaluateParams(Group):
    """Held-out evaluation."""

    variants: int = Field(ge=0, description="nearest other 3x3 patterns also attacked")
    colour_shifts: bool = Field(description="also ASR of contrast / tint shifted copies")


class ScanParams(Group):
    """The scanner (mesa_lib.detectors, calibrated by mesa_lib.calibration) and the scan
    deployment (flows/scan.py, docs/scanning.md)."""

    enabled: bool = Field(description="scan every model of the pipeline in `evaluate`")
    calibration: str = Field(description="the calibration file verdicts are made with")
    alpha: Probability = Field(description="false-alarm rate a new calibration is fitted for")
    floor: Positive = Field(description="smallest scale of a class's clean scores (calibration)")
    detectors: dict[str, dict[str, Any]] = Field(
        min_length=1, description="detector -> its settings (mesa_lib.detectors registry; keys "
                                  "left out take the detector's defaults), run in this order")
    images: int = Field(ge=16, description="reference images each detector uses")
    interval_s: int = Field(ge=0, description="deployment: seconds between runs; 0 = use cron")
    cron: str = Field(description="deployment: cron schedule, used when interval_s is 0")
    drop_folder: str = Field(description="watched folder of <stem>.safetensors + .json")
    drop_model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
                                 description="registered model that dropped models join")
    registry_models: Strings = Field(description="registered models audited; '*' = all")
    reference: str = Field(description="defender's clean data: auto | .npz | CIFAR archive")
    state_folder: str = Field(description="claims, done records, ledger, work files")
    repair: bool = Field(description="repair a backdoored model, re-scan, register it")
    task_runner: Literal["thread", "dask"]
    dask_address: str = Field(description="Dask scheduler (tcp://host:8786); '' = local")
    workers: Count = Field(description="threads, or workers of the local Dask cluster")
    class_chunks: Count = Field(description="a model's classes split into this many fits")
    grid_samples: int = Field(ge=1, le=64, description="trigger samples per class in the grid")
    claim_timeout_s: Count = Field(description="a claim older than this is stale")
    settle_s: int = Field(ge=0, description="drop files changed more recently wait a run")


    def __hash__(self) -> int:  # the detector blocks are dicts: hash the settings as JSON,
        # key order ignored as == ignores it
        return hash(json.dumps(self.model_dump(mode="json"), sort_keys=True))


class PlatformParams(Group):
    """The supply-chain platform around the scan service (docs/scanning.md): registry webhook
    receiver, signing, authenticated servers."""

    webhook_port: int = Field(ge=1, le=65535,
                              description="port of the registry-webhook receiver (127.0.0.1)")
    runner_poll_s: Count = Field(description="served deployments ask for triggered runs this "
                                             "often (s)")
    signing_key: str = Field(description="EC private key (PEM) that signs cleared and repaired "
                                         "models; '' = <state_folder>/keys/signing-key.pem, "
                                         "made on first use; env MESA_SIGNING_KEY overrides")
    trusted_keys: Annotated[tuple[str, ...], BeforeValidator(as_tuple)] = Field(
        description="public keys (PEM) besides our own whose signatures arriving models may "
                    "carry")
    auth: bool = Field(description="scan_services.sh starts MLflow and Prefect with auth on")


class Params(Group):
    """The whole params.yaml."""

    base: BaseParams
    data: DataParams
    validate_: ValidateParams = Field(alias="validate")  # `validate` is a BaseModel method
    poison: PoisonParams
    train: TrainParams
    recover: RecoverParams
    baseline: BaselineParams
    repair: RepairParams
    evaluate: EvaluateParams
    scan: ScanParams
    platform: PlatformParams

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @property
    def validate(self) -> ValidateParams:  # type: ignore[override]
        """The `validate` group (the attribute name pydantic reserves)."""
        return self.validate_

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        errors = []
        classes = NUM_CLASSES[self.data.name]
        if self.poison.target >= classes:
            errors.append(f"poison.target: expected int < {classes} ({self.data.name}), "
                          f"got {self.poison.target}")
        planted = self.poison.settings.get(self.poison.attack)
        if planted is None:
            errors.append(f"poison.attack: expected one of poison.settings "
                          f"{sorted(self.poison.settings)}, got {self.poison.attack!r}")
        elif planted.get("alpha", 1.0) != 1.0 or planted.get("location", "random") not in (
                "random", "corner"):
            # the stages measure ASR and recover triggers as full-strength patches, at the
            # corner or at random places (the zoo plants blends and fixed places)
            errors.append(f"poison.settings.{self.poison.attack}: the demo pipeline plants "
                          f"full-strength patches at 'random' or 'corner', got alpha "
                          f"{planted.get('alpha')}, location {planted.get('location')!r}")
        if self.recover.n_images and self.recover.n_images < self.recover.batch_size:
            errors.append(f"recover.n_images: expected 0 or >= recover.batch_size "
                          f"({self.recover.batch_size}), got {self.recover.n_images}")
        for name, block in self.scan.detectors.items():
            entry = detectors.detector(name)
            problem = entry.check(plugins.build(entry.config, block), self.scan.images)
            if problem:
                errors.append(f"scan.detectors.{name}.{problem}")
        if self.scan.images > self.data.n_defender:
            errors.append(f"scan.images: expected <= data.n_defender ({self.data.n_defender}),"
                          f" got {self.scan.images}")
        if self.scan.interval_s == 0 and not self.scan.cron.strip():
            errors.append("scan.interval_s: expected > 0 when scan.cron is empty, got 0")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (tuples as lists), as in params.yaml."""
        return json.loads(self.model_dump_json(by_alias=True))

    def section(self, *names: str) -> dict[str, Any]:
        """Flat {"group.key": value} of the named groups, for logging as run params."""
        full = self.to_dict()
        return leaves({g: full[g] for g in names})  # plug-in blocks: one param per setting

    def digest(self, *names: str) -> str:
        """sha256 of the named groups (all groups if none), canonical JSON: the params hash."""
        full = self.to_dict()
        chosen = {g: full[g] for g in (names or full)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- loading


def params_from_dict(raw: Any) -> Params:
    """Validate a decoded params mapping; every problem found is named in one ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params: expected a mapping of groups, got {type(raw).__name__}")
    raw, lines = plugins.check_blocks(raw, "scan", "detectors", "detector",
                                      {n: d.config for n, d in detectors.registered().items()})
    raw, more = plugins.check_blocks(raw, "poison", "settings", "attack",
                                     {n: a.config for n, a in poison.registered().items()})
    lines += more
    if not lines:
        try:
            return Params.model_validate(raw)
        except ValidationError as err:
            lines = [describe_error(e) for e in err.errors(include_url=False)]
    raise ConfigError("invalid params:\n" + "\n".join(lines))


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of `raw` with dotted keys replaced, e.g. {"train.epochs": 1} or
    {"scan.detectors.mask.steps": 4}; every level but the last must exist (used by tests)."""
    out = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        *path, key = dotted.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not path or not isinstance(node, dict):
            raise ConfigError(f"{dotted}: override must name a key inside an existing group")
        node[key] = value
    return out


def load_params(
    path: Path | str = PARAMS_FILE, overrides: Mapping[str, Any] | None = None
) -> Params:
    """Read and validate params.yaml (plus optional dotted overrides)."""
    raw = read_params_file(path)
    if overrides:
        raw = apply_overrides(raw or {}, overrides)
    try:
        return params_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def json_schema() -> str:
    """The JSON schema of params.yaml (docs/params.schema.json), deterministic text."""
    schema = Params.model_json_schema(by_alias=True, mode="validation")
    schema["title"] = "params.yaml of the MESA pipeline"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def describe_params() -> str:
    """Markdown table of every key, its type/constraints and description (docs)."""
    schema = json.loads(json_schema())
    lines = ["| key | expected | meaning |", "|---|---|---|"]
    for group, ref in schema["properties"].items():
        body = schema["$defs"][ref["$ref"].rsplit("/", 1)[-1]]
        for key, spec in body["properties"].items():
            rules = {k: v for k, v in spec.items() if k not in ("title", "description")}
            lines.append(f"| `{group}.{key}` | `{json.dumps(rules, sort_keys=True)}` | "
                         f"{spec.get('description', '')} |")
    blocks = {f"scan.detectors.{n}": d.config for n, d in detectors.registered().items()}
    blocks |= {f"poison.settings.{n}": a.config for n, a in poison.registered().items()}
    for where, config in blocks.items():  # the plug-ins' blocks, from their dataclasses
        for key, spec in plugins.block_schema(config)["properties"].items():
            rules = {k: v for k, v in spec.items() if k not in ("title", "description")}
            lines.append(f"| `{where}.{key}` | `{json.dumps(rules, sort_keys=True)}` | "
                         f"{spec.get('description', '')} |")
    return "\n".join(lines)


def _hydra_value(value: Any) -> str:
    """A value as `dvc exp run -S key=value` (Hydra override syntax) expects it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
        return f"'{value}'"
    return str(value)


def set_args(profile: Path | str, base: Path | str | None = None) -> list[str]:
    """`-S key=value` arguments that turn `base` into `profile`.

    `base` defaults to the file the profile is an overlay of. Profiles of params.yaml are
    validated first; for another base (reproduce/params-gpu.yaml over reproduce/params.yaml)
    each argument names that file, as `dvc exp run -S FILE:key=value` expects.
    """
    base = Path(base) if base is not None else overlay_base(profile)
    if base is None:
        raise ConfigError(f"{profile}: not an overlay (no {OVERLAY_KEY!r} key); name its base")
    ours = base.resolve() == PARAMS_FILE.resolve()
    if ours:
        load_params(profile)
    new, old = leaves(read_params_file(profile)), leaves(read_params_file(base))
    prefix = "" if ours else f"{base}:"
    args = []
    for key, value in new.items():
        if key not in old:  # Hydra's `+key=value` adds a key the base lacks (a plug-in block)
            args += ["-S", f"{prefix}+{key}={_hydra_value(value)}"]
        elif old[key] != value:
            args += ["-S", f"{prefix}{key}={_hydra_value(value)}"]
    return args


def _cli(argv: list[str] | None = None) -> None:
    """`python -m tasks.common.params check [FILE] | set-args PROFILE | describe | schema`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tasks.common.params")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="validate a params file").add_argument(
        "file", nargs="?", default=str(PARAMS_FILE))
    sub.add_parser("set-args", help="print `-S k=v` turning a profile's base into it"
                   ).add_argument("profile")
    sub.add_parser("describe", help="print every key as a Markdown table")
    sub.add_parser("schema", help="print the JSON schema of params.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            load_params(args.file)
            print(f"{args.file}: ok")
        elif args.command == "set-args":
            print(" ".join(set_args(args.profile)))
        elif args.command == "describe":
            print(describe_params())
        else:
            print(json_schema(), end="")
    except ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    _cli()

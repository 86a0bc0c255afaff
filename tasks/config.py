"""`params.yaml` -> typed, frozen dataclasses, checked once before any work (STYLE habit 3).

Every key of `params.yaml` is required and every key is known: an unknown key, a missing key, a
wrong type or an out-of-range value raises `ConfigError` naming the key, e.g.
`recover.alpha: expected float >= 0, got 'x'`. DVC reads the same file for its params deps, so
`dvc exp run -S recover.alpha=0.2` and `dvc params diff` see exactly what the stages use.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")
# Mirrors mesa_lib.models.MODELS (a test keeps them equal) so reading params needs no torch.
MODEL_NAMES = ("preact_resnet18", "resnet18", "resnet20", "resnet8")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
TRIGGER_RE = r"demo|random_color|pattern:(?:[0-9]|[1-4][0-9]|50)"


class ConfigError(ValueError):
    """params.yaml is unreadable, or a key is unknown, missing, mistyped or out of range."""


def spec(
    *, ge: float | None = None, gt: float | None = None, le: float | None = None,
    lt: float | None = None, choices: tuple | None = None, regex: str | None = None,
    doc: str = "",
) -> Any:
    """A required dataclass field with its range / choices checks in the metadata."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "regex": regex, "doc": doc}
    return field(metadata={k: v for k, v in meta.items() if v is not None})


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class BaseParams:
    """Run-wide settings."""

    seed: int = spec(ge=0, doc="seed of every random draw")
    device: str = spec(regex=r"auto|cpu|mps|cuda(?::\d+)?", doc="auto picks CUDA when present")
    deterministic: bool = spec(doc="torch.use_deterministic_algorithms (warn-only)")


@dataclass(frozen=True)
class DataParams:
    """Which raw data and how it is split."""

    name: str = spec(choices=tuple(NUM_CLASSES))
    archive: str = spec(doc="file or folder inside data/, or 'auto' (the one archive there)")
    n_train: int = spec(ge=0, doc="training images used, a seeded subset; 0 = all")
    n_defender: int = spec(ge=2, doc="test images given to the defender; the rest is held out")


@dataclass(frozen=True)
class ValidateParams:
    """Tolerances of the Great Expectations gates."""

    class_balance: float = spec(ge=0, le=1, doc="per-class count within this share of N/K")
    poison_rate_tolerance: float = spec(ge=0, le=1, doc="|measured - configured| poison rate")
    data_docs: bool = spec(doc="also render GX Data Docs HTML")


@dataclass(frozen=True)
class PoisonParams:
    """The attack."""

    attack: str = spec(choices=("badnets", "finetune_injection"))
    trigger: str = spec(regex=TRIGGER_RE, doc="demo | random_color | pattern:K (K = 0..50)")
    target: int = spec(ge=0)
    rate: float = spec(ge=0, le=1, doc="badnets: share of non-target images poisoned")
    location: str = spec(choices=("corner", "random"), doc="badnets: where the trigger goes")
    prob: float = spec(ge=0, le=1, doc="finetune_injection: per-image poison probability")


@dataclass(frozen=True)
class TrainParams:
    """Training of the (backdoored) classifier."""

    model: str = spec(choices=MODEL_NAMES)
    width: int = spec(ge=1, doc="resnet8 width multiplier (ignored by other models)")
    epochs: int = spec(ge=1, doc="badnets: training from scratch; injection: the clean model")
    batch_size: int = spec(ge=2)
    lr: float = spec(gt=0)
    momentum: float = spec(ge=0, lt=1)
    weight_decay: float = spec(ge=0)
    schedule: str = spec(choices=("onecycle", "cosine", "constant"))
    warmup: float = spec(gt=0, lt=1)
    label_smoothing: float = spec(ge=0, lt=1)
    inject_epochs: int = spec(ge=0, doc="finetune_injection: fine-tuning epochs with poison")
    inject_lr: float = spec(gt=0, doc="finetune_injection: constant SGD lr of the fine-tuning")


@dataclass(frozen=True)
class RecoverParams:
    """MESA: fitting the staircase of trigger generators (mesa_lib.mesa.MesaConfig)."""

    betas: tuple[float, ...] = spec(gt=0, le=1)
    alpha: float = spec(ge=0)
    epochs: int = spec(ge=1)
    batch_size: int = spec(ge=2)
    lr: float = spec(gt=0)
    hidden: int = spec(ge=1)
    mine_hidden: int = spec(ge=1)
    trigger_noise: float = spec(ge=0)
    n_images: int = spec(ge=0, doc="defender images used for fitting; 0 = all")
    grid_samples: int = spec(ge=1, le=1024, doc="triggers drawn for the PNG sample grid")


@dataclass(frozen=True)
class BaselineParams:
    """The single-point baseline (mesa_lib.baselines.PointConfig) and its repair."""

    starts: int = spec(ge=1, doc="random restarts; each gives one trigger")
    epochs: int = spec(ge=1, doc="passes over the images while optimising the triggers")
    batch_size: int = spec(ge=2)
    lr: float = spec(gt=0)
    momentum: float = spec(ge=0, lt=1)
    n_images: int = spec(ge=0, doc="defender images used to optimise; 0 = all")
    repair_epochs: int = spec(ge=1, doc="its repair's epochs (other settings: repair.*)")


@dataclass(frozen=True)
class RepairParams:
    """Fine-tuning the model against sampled triggers (labels kept true)."""

    epochs: int = spec(ge=1)
    batch_size: int = spec(ge=2)
    lr: float = spec(gt=0)
    momentum: float = spec(ge=0, lt=1)
    weight_decay: float = spec(ge=0)
    rate: float = spec(ge=0, le=1, doc="share of each batch stamped with a sampled trigger")
    augment: bool = spec()


@dataclass(frozen=True)
class EvaluateParams:
    """Held-out evaluation."""

    variants: int = spec(ge=0, doc="nearest other 3x3 patterns whose ASR is also reported")
    colour_shifts: bool = spec(doc="also ASR of contrast / tint shifted copies of the trigger")


@dataclass(frozen=True)
class ScanParams:
    """Detection (mesa_lib.detect): one MESA sub-model per candidate class, ASR outlier test."""

    enabled: bool = spec(doc="scan the backdoored and the repaired models in `evaluate`")
    epochs: int = spec(ge=1)
    batch_size: int = spec(ge=2, doc="images per step (each class sees all of them)")
    lr: float = spec(gt=0)
    beta: float = spec(gt=0, le=1)
    n_images: int = spec(ge=4, doc="defender images used (seeded subset): fit + ASR check")
    eval_images: int = spec(ge=2, doc="of which held out to measure each class's ASR")
    anomaly_threshold: float = spec(gt=0, doc="MAD anomaly index a class's ASR must exceed")
    min_asr: float = spec(ge=0, le=1, doc="ASR a flagged class must also reach")
    # The scan deployment (flows/scan.py, docs/scanning.md); evaluate ignores these keys.
    interval_s: int = spec(ge=0, doc="deployment: seconds between discovery runs; 0 = cron")
    cron: str = spec(doc="deployment: cron schedule, used when interval_s is 0")
    drop_folder: str = spec(doc="watched folder of <stem>.safetensors + .json (only read)")
    drop_model_name: str = spec(regex=r"[A-Za-z0-9][A-Za-z0-9_.\-]*",
                                doc="registered model that drop-folder models become versions of")
    registry_models: tuple[str, ...] = spec(doc="registered models audited; '*' = all")
    reference: str = spec(doc="defender's clean data: auto | path to an .npz or a CIFAR archive")
    state_folder: str = spec(doc="claims, done records, ledger and work files (git-ignored)")
    repair: bool = spec(doc="repair a backdoored model, re-scan it, register the repaired one")
    task_runner: str = spec(choices=("thread", "dask"), doc="where scan tasks run")
    dask_address: str = spec(doc="Dask scheduler (tcp://host:8786); '' = a local cluster")
    workers: int = spec(ge=1, doc="threads, or workers of the local Dask cluster")
    class_chunks: int = spec(ge=1, doc="one model's classes split into this many parallel fits")
    trigger_size: int = spec(ge=1, le=16, doc="side of the square triggers searched")
    grid_samples: int = spec(ge=1, le=64, doc="trigger samples per class in the PNG grid")
    claim_timeout_s: int = spec(ge=1, doc="a claim older than this is stale (crashed scan)")
    settle_s: int = spec(ge=0, doc="drop files changed more recently wait for the next run")


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    base: BaseParams
    data: DataParams
    validate: ValidateParams
    poison: PoisonParams
    train: TrainParams
    recover: RecoverParams
    baseline: BaselineParams
    repair: RepairParams
    evaluate: EvaluateParams
    scan: ScanParams

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (tuples as lists), as in params.yaml."""
        return json.loads(json.dumps(asdict(self)))

    def section(self, *names: str) -> dict[str, Any]:
        """Flat {"group.key": value} of the named groups, for logging as run params."""
        full = self.to_dict()
        return {f"{g}.{k}": v for g in names for k, v in full[g].items()}

    def digest(self, *names: str) -> str:
        """sha256 of the named groups (all groups if none), canonical JSON: the params hash."""
        full = self.to_dict()
        chosen = {g: full[g] for g in (names or full)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- checking


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    """'float >= 0', 'int in (0, 1]', "one of 'a', 'b'", 'list of float > 0' ..."""
    if "choices" in meta:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if "regex" in meta:
        return f"{tp.__name__} matching {meta['regex']!r}"
    name = f"list of {typing.get_args(tp)[0].__name__}" if _is_tuple(tp) else tp.__name__
    lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if lo and hi:
        return f"{name} in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"{name} {'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f"{name} {'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return name


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def _scalar_ok(value: Any, tp: type, meta: Mapping[str, Any]) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # YAML true is not the number 1
    if tp is float and not isinstance(value, int | float):
        return False
    if tp in (int, str) and not isinstance(value, tp):
        return False
    if "choices" in meta and value not in meta["choices"]:
        return False
    if "regex" in meta and not re.fullmatch(meta["regex"], value):
        return False
    checks = {"ge": lambda a, b: a >= b, "gt": lambda a, b: a > b,
              "le": lambda a, b: a <= b, "lt": lambda a, b: a < b}
    return all(op(value, meta[k]) for k, op in checks.items() if k in meta)


def _convert(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """Check one value against its type and range; return it typed (float, tuple)."""
    if _is_tuple(tp):
        item = typing.get_args(tp)[0]
        ok = isinstance(value, list | tuple) and len(value) > 0
        if not ok or not all(_scalar_ok(v, item, meta) for v in value):
            raise ConfigError(f"{key}: expected non-empty {_describe(tp, meta)}, got {value!r}")
        return tuple(item(v) for v in value)
    if not _scalar_ok(value, tp, meta):
        raise ConfigError(f"{key}: expected {_describe(tp, meta)}, got {value!r}")
    return tp(value)


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    errors = [f"{name}.{k}: unknown key (known: {', '.join(known)})" for k in raw if k not in known]
    errors += [f"{name}.{k}: missing" for k in known if k not in raw]
    values = {}
    for key, f in known.items():
        if key in raw:
            try:
                values[key] = _convert(f"{name}.{key}", raw[key], hints[key], f.metadata)
            except ConfigError as err:
                errors.append(str(err))
    if errors:
        raise ConfigError("\n".join(errors))
    return cls(**values)


def _cross_checks(p: Params) -> list[str]:
    """Constraints between keys."""
    errors = []
    classes = NUM_CLASSES[p.data.name]
    if p.poison.target >= classes:
        errors.append(f"poison.target: expected int < {classes} ({p.data.name}), "
                      f"got {p.poison.target}")
    if p.recover.n_images and p.recover.n_images < p.recover.batch_size:
        errors.append(f"recover.n_images: expected 0 or >= recover.batch_size "
                      f"({p.recover.batch_size}), got {p.recover.n_images}")
    if 2 * p.scan.eval_images > p.scan.n_images:
        errors.append(f"scan.eval_images: expected <= scan.n_images / 2 "
                      f"({p.scan.n_images // 2}), got {p.scan.eval_images}")
    if p.scan.n_images > p.data.n_defender:
        errors.append(f"scan.n_images: expected <= data.n_defender ({p.data.n_defender}), "
                      f"got {p.scan.n_images}")
    if p.scan.interval_s == 0 and not p.scan.cron.strip():
        errors.append("scan.interval_s: expected > 0 when scan.cron is empty, got 0")
    return errors


def params_from_dict(raw: Any) -> Params:
    """Validate a decoded params mapping; every problem found is named in one ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params: expected a mapping of groups, got {type(raw).__name__}")
    hints = typing.get_type_hints(Params)
    errors = [f"{g}: unknown group (known: {', '.join(hints)})" for g in raw if g not in hints]
    errors += [f"{g}: missing group" for g in hints if g not in raw]
    sections = {}
    for group, cls in hints.items():
        if group in raw:
            try:
                sections[group] = _section(group, cls, raw[group])
            except ConfigError as err:
                errors.append(str(err))
    if errors:
        raise ConfigError("invalid params:\n" + "\n".join(errors))
    params = Params(**sections)
    if errors := _cross_checks(params):
        raise ConfigError("invalid params:\n" + "\n".join(errors))
    return params


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of `raw` with dotted keys replaced, e.g. {"train.epochs": 1} (used by tests)."""
    out = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        group, _, key = dotted.partition(".")
        if not key or not isinstance(out.get(group), dict):
            raise ConfigError(f"{dotted}: override must name group.key of an existing group")
        out[group][key] = value
    return out


def load_params(
    path: Path | str = PARAMS_FILE, overrides: Mapping[str, Any] | None = None
) -> Params:
    """Read and validate params.yaml (plus optional dotted overrides)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if overrides:
        raw = apply_overrides(raw or {}, overrides)
    try:
        return params_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def describe_params() -> str:
    """Markdown table of every key, its type/range and doc (for docs/pipeline.md)."""
    lines = ["| key | expected | meaning |", "|---|---|---|"]
    for group, cls in typing.get_type_hints(Params).items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            desc = _describe(hints[f.name], f.metadata)
            lines.append(f"| `{group}.{f.name}` | {desc} | {f.metadata.get('doc', '')} |")
    return "\n".join(lines)



def _hydra_value(value: Any) -> str:
    """A value as `dvc exp run -S key=value` (Hydra override syntax) expects it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
        return f"'{value}'"
    return str(value)


def set_args(profile: Path | str, base: Path | str = PARAMS_FILE) -> list[str]:
    """`-S key=value` arguments that turn `base` into `profile` (both validated first)."""
    new, old = load_params(profile).to_dict(), load_params(base).to_dict()
    args = []
    for group, values in new.items():
        for key, value in values.items():
            if old[group][key] != value:
                args += ["-S", f"{group}.{key}={_hydra_value(value)}"]
    return args


def _cli(argv: list[str] | None = None) -> None:
    """`python -m tasks.config check [FILE] | set-args PROFILE | describe`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tasks.config")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="validate a params file").add_argument(
        "file", nargs="?", default=str(PARAMS_FILE))
    sub.add_parser("set-args", help="print `-S k=v` turning params.yaml into a profile"
                   ).add_argument("profile")
    sub.add_parser("describe", help="print every key as a Markdown table")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            load_params(args.file)
            print(f"{args.file}: ok")
        elif args.command == "set-args":
            print(" ".join(set_args(args.profile)))
        else:
            print(describe_params())
    except ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    _cli()

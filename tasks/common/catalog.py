"""The artifact catalog: every file the pipeline reads or writes, its path and its format.

One module names them all (Kedro's Data Catalog idea): the tasks read and write through these
entries, and `dvc.yaml` lists the same paths as stage outs, metrics and plots (a test keeps the
two equal). Paths are relative to the project root, which is the working directory of every DVC
stage command. Everything the pipeline produces lives under `artifacts/`; `data/` holds only the
raw archive tracked by `data.dvc`.

Formats:
    npz          numpy archive of plain arrays (no pickles; read with allow_pickle=False)
    model        `<stem>.safetensors` + `<stem>.json` manifest (mesa_lib.modelio)
    sampler      `<stem>.safetensors` tensors + `<stem>.json` config (TriggerDistribution,
                 PointDistribution `to_tensors()` / `config()`)
    json         a JSON object; `metrics` entries are what `dvc metrics show` and MLflow read
    csv          comma-separated with a header row (DVC plots)
    png          an image (trigger grids via torchvision.utils.save_image)
    html-dir     a folder of HTML (Great Expectations Data Docs)
    folder       one entry per flagged target: `target_<k>` samplers and PNG grids, with an
                 index JSON (`found.json`, `triggers.json`) always present
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesa_lib import modelfiles

DATA_DIR = Path("data")
DATA_DVC = Path("data.dvc")
ARTIFACTS = Path("artifacts")


@dataclass(frozen=True)
class Artifact:
    """One catalogued artifact.

    Attributes:
        name: catalog key.
        stage: the DVC stage that writes it.
        path: for `model` and `sampler` the stem (files `<stem>.safetensors`, `<stem>.json`).
        fmt: one of the formats in the module docstring.
        role: "out" (a cached DVC out), "metrics" (a stage's metrics file) or "plots" (a CSV
            out that dvc.yaml's top-level `plots:` section renders).
    """

    name: str
    stage: str
    path: Path
    fmt: str
    role: str = "out"

    def files(self) -> tuple[Path, ...]:
        """The concrete paths DVC tracks (two for models and samplers)."""
        if self.fmt in ("model", "sampler"):
            return modelfiles.files(self.path)
        return (self.path,)


def _a(name: str, stage: str, rel: str, fmt: str, role: str = "out") -> Artifact:
    return Artifact(name, stage, ARTIFACTS / rel, fmt, role)


_ENTRIES = (
    # data: decode the raw archive, subset the training set, split the test set.
    _a("dataset", "data", "data/dataset.npz", "npz"),
    _a("data_metrics", "data", "metrics/data.json", "json", "metrics"),
    # validate: Great Expectations gates on the raw data and the splits.
    _a("raw_quality", "validate", "validate/expectations.json", "json"),
    _a("raw_data_docs", "validate", "validate/data_docs", "html-dir"),
    _a("validate_metrics", "validate", "metrics/validate.json", "json", "metrics"),
    # poison: the attacker's training set (static poisoning) and its quality gate.
    _a("poisoned", "poison", "poison/poisoned.npz", "npz"),
    _a("trigger_png", "poison", "poison/trigger.png", "png"),
    _a("poison_quality", "poison", "poison/expectations.json", "json"),
    _a("poison_metrics", "poison", "metrics/poison.json", "json", "metrics"),
    # train: the backdoored classifier.
    _a("backdoored", "train", "train/backdoored", "model"),
    _a("injection_quality", "train", "train/injection_expectations.json", "json"),
    _a("train_metrics", "train", "metrics/train.json", "json", "metrics"),
    _a("train_curve", "train", "plots/train_epochs.csv", "csv", "plots"),
    # recover: the scan, and MESA's staircase over each flagged target's trigger geometry.
    _a("recovered", "recover", "recover/recovered", "folder"),
    _a("recover_metrics", "recover", "metrics/recover.json", "json", "metrics"),
    _a("recover_curve", "recover", "plots/recover_epochs.csv", "csv", "plots"),
    # baseline: single-point triggers, and the model repaired and verified against them.
    _a("point_triggers", "baseline", "baseline/triggers", "folder"),
    _a("baseline_repaired", "baseline", "baseline/repaired", "model"),
    _a("baseline_verification", "baseline", "baseline/verification.json", "json"),
    _a("baseline_metrics", "baseline", "metrics/baseline.json", "json", "metrics"),
    _a("baseline_curve", "baseline", "plots/baseline_repair_epochs.csv", "csv", "plots"),
    # repair: the model fine-tuned against MESA samples, and its verification.
    _a("repaired", "repair", "repair/repaired", "model"),
    _a("repair_verification", "repair", "repair/verification.json", "json"),
    _a("repair_metrics", "repair", "metrics/repair.json", "json", "metrics"),
    _a("repair_curve", "repair", "plots/repair_epochs.csv", "csv", "plots"),
    # evaluate: held-out clean accuracy and ASR per trigger, before and after repair; scan.
    _a("scan", "evaluate", "evaluate/scan.json", "json"),
    _a("evaluate_metrics", "evaluate", "metrics/evaluate.json", "json", "metrics"),
    _a("asr_table", "evaluate", "plots/asr_per_trigger.csv", "csv", "plots"),
)

CATALOG: dict[str, Artifact] = {a.name: a for a in _ENTRIES}


def get(name: str) -> Artifact:
    """The catalog entry `name`; an unknown name lists the known ones."""
    if name not in CATALOG:
        raise KeyError(f"no artifact {name!r} in the catalog; known: {sorted(CATALOG)}")
    return CATALOG[name]


def path(name: str) -> Path:
    """Path (or stem, for models and samplers) of artifact `name`."""
    return get(name).path


def of_stage(stage: str, role: str | None = None) -> list[Artifact]:
    """The artifacts a stage writes, optionally only one role."""
    return [a for a in _ENTRIES if a.stage == stage and (role is None or a.role == role)]


def metrics_path(stage: str) -> Path:
    """The metrics JSON of a stage (the dict DVC and MLflow both read)."""
    (entry,) = of_stage(stage, "metrics")
    return entry.path

"""Finding models that have not been scanned: the watched drop folder and the Model Registry.

A model is identified by its *key*: the sha256 over the sha256 digests of its weights, its
manifest and (optional) its reference data, so the same files found twice (dropped and also
registered, or two overlapping discovery runs) are one model, and a manifest that arrives after
its weights makes a new model that is scanned again. Claims and done records (tasks.scan.claims) are
keyed by it.

Drop folder: flat, only read (never written, moved or deleted). Files are grouped by stem:
`<stem>.safetensors` weights, `<stem>.json` manifest, optional `<stem>.data.npz` reference data
(uint8 `images` (N, C, H, W), int64 `labels` (N,), str `classes`), optional `<stem>.sig`
signature (tasks.scan.signing: verified before anything else); `<stem>.onnx`; a sub-folder
`<stem>/` that is a Hugging Face / timm model (config.json + model.safetensors, its other files
ignored; a `<stem>.sig` beside it joins it); any other file is a group of its own, rejected by
the scan (pickles are never loaded). Hidden files, other sub-folders, symlinks and `*.tmp` /
`*.part` files are ignored, and a model folder holding a symlink is rejected (the service would
copy what it points at); a group changed less than `scan.settle_s` ago waits for the next run (a
copy in progress).

Registry: every version of `scan.registry_models` whose `scan_verdict` tag is missing or
"not scanned"; its artifact folder is downloaded into the state folder and must hold one model:
a `.safetensors` + `.json` pair, an `.onnx` file or a Hugging Face / timm folder.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mesa_lib import modelfiles
from mesa_lib.modelfiles import MANIFEST_SUFFIX, WEIGHTS_SUFFIX
from mesa_lib.modelio import sha256_file
from tasks.common import tracking
from tasks.common.escape import escape
from tasks.common.params import Params
from tasks.scan.claims import Ledger

REFERENCE_SUFFIX = ".data.npz"
SIGNATURE_SUFFIX = ".sig"  # model-signing bundle over <stem>.safetensors + <stem>.json
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
UNSCANNED = ("", "not scanned")


@dataclass(frozen=True)
class Candidate:
    """One model to scan; small and picklable (tasks pass it, never tensors).

    Attributes:
        key: sha256 over the digests of its files (claims, done records).
        source: "drop" or "registry".
        label: human name, e.g. "drop:model_a" or "registry:mesa-backdoored/3", escaped
            (tasks.common.escape) when made: safe in logs, run names, tags and JSON.
        files: local paths of every file of the model (drop folder or downloaded copy).
        weights_sha256: sha256 of the `.safetensors` file ("" if there is none).
        name, version: the registered model version (registry candidates).
        stats: (escaped file name, size, mtime_ns) of drop files, for the ledger.
        problem: a reason to reject found before loading (e.g. unfetchable artifacts).
        folder: the model's folder when it is a folder format (mesa_lib.modelfiles), else "".
    """

    key: str
    source: str
    label: str
    files: tuple[str, ...]
    weights_sha256: str = ""
    name: str = ""
    version: str = ""
    stats: tuple[tuple[str, int, int], ...] = field(default=())
    problem: str = ""
    folder: str = ""

    def file(self, suffix: str) -> Path | None:
        """The candidate's file ending in `suffix`, if any."""
        return next((Path(f) for f in self.files if f.endswith(suffix)), None)

    def weights(self) -> Path | None:
        """The candidate's weights file, whatever its format (mesa_lib.modelfiles), if any."""
        return next((Path(f) for f in self.files if modelfiles.role(f) == "weights"), None)


def model_key(files: list[Path]) -> tuple[str, str]:
    """(key over all files' digests by role, sha256 of the weights or "")."""
    digests = {_role(p): sha256_file(p) for p in files}
    text = "\n".join(f"{role}={d}" for role, d in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest(), digests.get("weights", "")


def files_key(files: list[Path] | tuple[str, ...]) -> str:
    """The key of a model's own files only (weights and manifest): what a scan run records and
    the registry audit compares with a version's files (a signature added later, or a
    reference file beside it, leaves it unchanged)."""
    return model_key([Path(f) for f in files if _role(Path(f)) in ("weights", "manifest")])[0]


def _role(path: Path) -> str:
    name = Path(path).name
    if name.endswith(REFERENCE_SUFFIX):
        return "reference"
    if name.endswith(SIGNATURE_SUFFIX):
        return "signature"
    return modelfiles.role(name) or name


def _stem(name: str) -> str:
    for sidecar in (REFERENCE_SUFFIX, SIGNATURE_SUFFIX):
        if name.endswith(sidecar) and len(name) > len(sidecar):
            return name[: -len(sidecar)]
    return modelfiles.stem(name).name


def drop_groups(folder: Path) -> dict[str, list[Path]]:
    """Files of the drop folder grouped by model stem (see the module docstring); a model
    folder's group holds its format's files (`model_folder` tells it apart)."""
    groups: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return groups
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_symlink():
            continue
        if path.is_dir():
            if model_format(path) is not None:
                groups.setdefault(path.name, []).extend(model_format(path).paths(path))
        elif path.is_file() and not path.name.endswith(_IGNORED_SUFFIXES):
            groups.setdefault(_stem(path.name), []).append(path)
    return groups


def model_format(folder: Path) -> modelfiles.ModelFormat | None:
    """The folder format `folder` is a model of (modelfiles.FolderFormat), or None."""
    return next((f for f in modelfiles.FORMATS.values()
                 if isinstance(f, modelfiles.FolderFormat) and f.holds(folder)), None)


def model_folder(files: list[Path]) -> Path | None:
    """The model folder a group's files are in, if they are a folder model's."""
    parents = {p.parent for p in files if _role(p) == "weights"}
    return next((d for d in parents if model_format(d) is not None), None)


def _folder_problem(folder: Path, files: list[Path]) -> str:
    """Why a folder model is refused before it is read ('' if it is not)."""
    links = [p.name for p in files if p.parent == folder and p.is_symlink()]
    if links:
        return (f"{escape(folder.name)}/: {', '.join(map(escape, links))} is a symbolic link; "
                "refused (a model's files must be plain files)")
    return ""


def _stats(files: list[Path], root: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((escape(p.relative_to(root).as_posix()), (s := p.stat()).st_size,
                  s.st_mtime_ns) for p in files)


def drop_candidates(params: Params, ledger: Ledger, settle_s: float | None = None
                    ) -> list[Candidate]:
    """Groups of the drop folder not in the ledger and not changed in the last settle_s."""
    folder = Path(params.scan.drop_folder)
    settle = params.scan.settle_s if settle_s is None else settle_s
    seen = ledger.seen()
    out = []
    for stem, files in drop_groups(folder).items():
        stats = _stats(files, folder)
        if time.time() - max(s[2] for s in stats) / 1e9 < settle:
            continue  # still being copied
        if all(tuple(s) in seen for s in stats) and len({seen[s] for s in stats}) == 1:
            continue  # exactly these files were processed before
        key, weights = model_key(files)
        home = model_folder(files)
        out.append(Candidate(key, "drop", f"drop:{escape(stem)}", tuple(str(p) for p in files),
                             weights, stats=stats, folder=str(home or ""),
                             problem=_folder_problem(home, files) if home else ""))
    return out


def unscanned_versions(params: Params) -> list[dict]:
    """Registry versions of the watched models without a scan verdict."""
    versions = tracking.model_versions(params.scan.registry_models)
    return [v for v in versions if v["tags"].get("scan_verdict", "") in UNSCANNED]


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def fetch_version(version: dict, work: Path) -> Candidate:
    """Download one registry version's files and describe it as a Candidate (I/O: retried)."""
    label = f"registry:{escape(version['name'])}/{version['version']}"
    dst = Path(work) / "registry" / version["name"] / version["version"]
    try:
        folder = tracking.download_model_version(version["source"], dst)
    except tracking.ModelSourceError as err:
        digest = hashlib.sha256(f"{label}|{version['source']}".encode()).hexdigest()
        return Candidate(digest, "registry", label, (), name=version["name"],
                         version=version["version"], problem=str(err))
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    home = next((d for d in (Path(folder), *sorted(Path(folder).rglob("*")))
                 if d.is_dir() and model_format(d) is not None), None)
    weights = [p for p in files if modelfiles.role(p) == "weights"]
    problem = ""
    if home is not None:  # a signature of it: inside (a version we signed) or beside it
        chosen = list(model_format(home).paths(home))
        chosen += [s for s in (home / f"{home.name}{SIGNATURE_SUFFIX}",
                               home.parent / f"{home.name}{SIGNATURE_SUFFIX}") if s.is_file()][:1]
    elif len(weights) != 1:
        names = [str(p.relative_to(folder)) for p in files][:10]
        problem = (f"the version's artifacts hold {len(weights)} weights files (need one "
                   f"<stem>{WEIGHTS_SUFFIX} + <stem>{MANIFEST_SUFFIX}, one <stem>.onnx or one "
                   f"Hugging Face folder; pickled models are refused): {names}")
        chosen = files
    else:
        chosen = [p for p in files if _stem(p.name) == _stem(weights[0].name)]
    key, sha = model_key(chosen) if chosen else (hashlib.sha256(label.encode()).hexdigest(), "")
    return Candidate(key, "registry", label, tuple(str(p) for p in chosen), sha,
                     version["name"], version["version"], problem=problem,
                     folder=str(home or ""))

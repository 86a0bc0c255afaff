"""`mesa-scan`: scan model files for backdoors offline, no servers (the scan service's core).

    mesa-scan [--reference PATH] [--format text|json|sarif] [--params FILE]
              [--calibration FILE] [--repair OUTDIR] PATH...
    mesa-scan --verify-signature [--public-key PEM]... [--format text|json] PATH...

PATH: a `<stem>.safetensors` + `<stem>.json` pair (either file, or the stem), or a folder of them.
--reference: the defender's clean images: a CIFAR archive in any format the project reads (the
defender part of its test split is used) or an .npz (`images` uint8 (N, C, H, W), `labels`,
`classes`); default: the project's data source. Verdicts are calibrated (mesa_lib.calibration)
with --calibration (default: params.yaml `scan.calibration`), which must match the scan settings.

--format sarif writes a SARIF 2.1.0 log (tasks.scan.sarif) for code-scanning UIs.

--repair OUTDIR: each backdoored model is repaired against every flagged target's recovered
triggers (params `repair`; tasks.scan.defend) and verified on reference images neither the scan
nor the repair used; the repaired pair is written to OUTDIR/<stem>.safetensors + .json (never over
the model itself) and the model's record gains a `repair` object: `files`, the verification
`verdict` (clean | backdoored) and `reason`, each target's recovered trigger ASR before and
after, accuracy before and after, the settings and image counts. The exit code stays that of
the scanned models.

--verify-signature checks each model's `<stem>.sig` (OpenSSF model-signing, key-based;
tasks.scan.signing) offline instead of scanning: against --public-key files, default the scan
service's public key (params `platform.signing_key` / MESA_SIGNING_KEY / the state folder) and
`platform.trusted_keys`. Exit 0: every signature holds; 2: one does not (altered file, other
key, missing signature); 3: no public key to check with.

Exit code: the highest of its models': 0 all clean, 1 a backdoor found, 2 a file rejected,
3 an error (no calibration, unreadable reference, a folder holding no model, a scan that
crashed: its verdict is "error"), 4 a model outside the calibration (verdict "uncalibrated":
another architecture, input shape or class count than the calibration's clean models; its
scores are shown; tasks.scan.coverage). Names are printed escaped, in text, JSON and SARIF alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mesa_lib import modelfiles  # noqa: E402
from tasks.common.env import apply_defaults

apply_defaults()

import torch  # noqa: E402

from mesa_lib.calibration import CalibrationError  # noqa: E402
from mesa_lib.data import DataError  # noqa: E402
from mesa_lib.modelio import Manifest, save_model  # noqa: E402
from mesa_lib.seed import resolve_device  # noqa: E402
from mesa_lib.verdict import Verdict  # noqa: E402
from tasks.common.configs import scan_settings  # noqa: E402
from tasks.common.env import default_data_source  # noqa: E402
from tasks.common.escape import escape  # noqa: E402
from tasks.common.params import Params, load_params  # noqa: E402
from tasks.common.settings import ConfigError  # noqa: E402
from tasks.scan import sarif, signing  # noqa: E402
from tasks.scan.core import (  # noqa: E402
    Rejected,
    inspect,
    load_calibration,
    measure_chunk,
    record,
    verdict_of,
)
from tasks.scan.coverage import UNCALIBRATED, gap  # noqa: E402
from tasks.scan.coverage import reason as outside_reason  # noqa: E402
from tasks.scan.defend import CannotRepair, repair_scanned  # noqa: E402
from tasks.scan.hygiene import manifest_problem  # noqa: E402
from tasks.scan.reference import Reference, load_reference, reference_batch  # noqa: E402

PROJECT = Path(__file__).resolve().parents[2]
EXIT = {"clean": 0, "backdoored": 1, "rejected": 2, "error": 3, UNCALIBRATED: 4}


def model_stems(paths: list[Path]) -> list[Path]:
    """Every model stem named by the arguments (files, stems or folders), in order, once."""
    stems: list[Path] = []
    for path in paths:
        found = modelfiles.find(path) if path.is_dir() else [modelfiles.stem(path)]
        stems += [s for s in found if s not in stems]
    return stems


def empty_folders(paths: list[Path]) -> list[tuple[Path, str]]:
    """(folder, reason) for each folder argument holding no model: an error, never a silent
    "nothing found" that a CI gate would read as clean."""
    out = []
    for path in paths:
        if path.is_dir() and not modelfiles.find(path):
            names = sorted(p.name for p in path.iterdir())[:8]
            found = f"; it holds {', '.join(escape(n) for n in names)}" if names else " (empty)"
            out.append((path, f"{escape(path)}: no model in this folder (<stem>.safetensors + "
                              f"<stem>.json; pickled checkpoints are never loaded){found}"))
    return out


def _reference(params: Params, spec: str | None) -> Reference:
    source = spec or str(default_data_source(PROJECT))
    scan = params.scan.model_copy(update={"reference": source})
    return load_reference(params.model_copy(update={"scan": scan}))


def scan_one(stem: Path, ref: Reference, params: Params, calibration: Any,
             device: torch.device, repair_dir: Path | None = None) -> dict[str, Any]:
    """One model's verdict record (rejected with the reason if it cannot be scanned safely);
    with `repair_dir`, a backdoored model is repaired there and the record says how it went."""
    start = time.perf_counter()
    problem = manifest_problem(stem, str(stem))
    if problem:
        return record(str(stem), None, problem, {"total": time.perf_counter() - start})
    try:
        model, manifest = inspect(stem, len(ref.classes), tuple(ref.images.shape[1:]),
                                  ref.images[:2], device)
    except Rejected as err:
        return record(str(stem), None, str(err), {"total": time.perf_counter() - start})
    except RecursionError:
        return record(str(stem), None, f"{stem}.json: too deeply nested to parse; refused",
                      {"total": time.perf_counter() - start})
    checked = time.perf_counter()
    images, labels = reference_batch(ref, params.scan.images, params.base.seed)
    n = manifest.num_classes
    chunk = measure_chunk(model, images, labels, tuple(range(n)), scan_settings(params), device,
                          keep=0)
    verdict = verdict_of([chunk], calibration)
    seconds = {"check": checked - start, **chunk.seconds, "total": time.perf_counter() - start}
    out = record(str(stem), verdict, seconds=seconds, architecture=manifest.architecture)
    why = gap(calibration, manifest)
    if why:  # no verdict, and so no repair, against a null that holds no model like it
        return out | {"verdict": UNCALIBRATED, "target": None, "targets": [],
                      "reason": outside_reason(why)}
    if repair_dir is not None and verdict.status == "backdoored":
        out["repair"] = repair_one(stem, model, manifest, verdict, ref, params, calibration,
                                   device, repair_dir)
    return out


def repair_one(stem: Path, model: torch.nn.Module, manifest: Manifest, verdict: Verdict,
               ref: Reference, params: Params, calibration: Any, device: torch.device,
               repair_dir: Path) -> dict[str, Any]:
    """Repair and verify a backdoored model, write it to `repair_dir`: the `repair` record."""
    out = repair_dir / stem.name
    if out.resolve() == stem.resolve():
        return {"error": f"--repair {escape(repair_dir)} would overwrite the model itself"}
    try:
        done = repair_scanned(model, ref, verdict.targets or (verdict.target,), verdict.detector,
                              params, calibration, device)
    except CannotRepair as err:
        return {"error": escape(err)}
    repair_dir.mkdir(parents=True, exist_ok=True)
    extra = {**manifest.extra, "repair": f"{done.outcome.method} against {verdict.detector} "
             f"triggers", "repaired_from": stem.name}
    weights = save_model(model, out, replace(manifest, extra=extra))
    files = [escape(f) for f in modelfiles.files(modelfiles.stem(weights))]
    return {"files": files, **done.outcome.record()}


def text_line(rec: dict[str, Any]) -> str:
    """One human line per model."""
    if rec["verdict"] in ("rejected", "error"):
        return f"{rec['verdict'].upper():10s}  {rec['model']}: {rec['reason']}"
    if rec["verdict"] == UNCALIBRATED:
        return (f"UNCALIBRATED {rec['model']}: p = {rec['p_value']:.3f} would mean nothing: "
                f"{rec['reason']}")
    head = "BACKDOORED" if rec["verdict"] == "backdoored" else "clean     "
    target = f" target {rec['target']}," if rec["target"] is not None else ""
    line = (f"{head}  {rec['model']}:{target} p = {rec['p_value']:.3f} "
            f"({rec['detector']} detector; {rec['seconds'].get('total', 0):.1f} s)")
    return line + (f"\n{repair_line(rec['repair'])}" if "repair" in rec else "")


def repair_line(rep: dict[str, Any]) -> str:
    """The indented line saying what a repair did."""
    if "error" in rep:
        return f"            not repaired: {rep['error']}"
    asr = ", ".join(f"class {t['target']} {t['asr_before']:.0%} -> {t['asr_after']:.0%}"
                    for t in rep["targets"])
    head = "verified clean" if rep["verdict"] == "clean" else "FAILED verification"
    return (f"            repaired -> {rep['files'][0]}: {head} (trigger ASR {asr}; accuracy "
            f"{rep['accuracy_before']:.1%} -> {rep['accuracy_after']:.1%})"
            + (f": {rep['reason']}" if rep["reason"] else ""))


def verify_one(stem: Path, keys: list[Path]) -> dict[str, Any]:
    """One model's signature check: {model, signature, verdict verified|rejected, ...}."""
    sig = Path(f"{stem}{signing.SUFFIX}")
    out = {"model": escape(stem), "signature": escape(sig)}
    try:
        key = signing.verify(stem, sig, keys)
    except signing.SignatureError as err:
        return out | {"verdict": "rejected", "reason": escape(err)}
    return out | {"verdict": "verified", "key": key}


def _public_keys(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """(--public-key files, else the service's public key and params' trusted keys; the paths
    looked at). Relative paths in the params file are read from the params file's folder, so
    the command works from any folder."""
    if args.public_key:
        return list(args.public_key), list(args.public_key)
    params = load_params(args.params)
    home = Path(args.params).resolve().parent
    own = signing.key_paths(params).public
    if not (os.environ.get(signing.KEY_ENV) or Path(params.platform.signing_key).is_absolute()
            or Path(params.scan.state_folder).is_absolute()):
        own = home / own.relative_to(Path.cwd().resolve())
    wanted = [own, *(home / t for t in params.platform.trusted_keys)]
    return [k for k in wanted if k.is_file()], wanted


def verify_main(args: argparse.Namespace) -> int:
    """`--verify-signature`: check every model's signature offline."""
    try:
        keys, wanted = _public_keys(args)
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {escape(err)}", file=sys.stderr)
        return EXIT["error"]
    missing = [k for k in wanted if not k.is_file()]
    if not keys or (args.public_key and missing):
        print(f"error: no public key to verify with: {', '.join(escape(k) for k in missing)} "
              "not found (the scan service's key is made by its first start; or give "
              "--public-key PEM)", file=sys.stderr)
        return EXIT["error"]
    records = [verify_one(stem, keys) for stem in model_stems(args.paths)]
    if args.format == "json":
        print(json.dumps(records, indent=2))
    else:
        for rec in records:
            tail = f"signed by key {rec['key']}" if rec["verdict"] == "verified" else rec["reason"]
            print(f"{rec['verdict'].upper():10s}  {rec['model']}: {tail}")
    return EXIT["rejected"] if any(r["verdict"] != "verified" for r in records) else 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mesa-scan", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    ap.add_argument("--reference", help="CIFAR archive or .npz of clean images")
    ap.add_argument("--format", choices=("text", "json", "sarif"), default="text")
    ap.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    ap.add_argument("--calibration", type=Path, help="default: params scan.calibration")
    ap.add_argument("--repair", type=Path, metavar="OUTDIR",
                    help="repair each backdoored model into OUTDIR and verify it")
    ap.add_argument("--verify-signature", action="store_true",
                    help="check each model's <stem>.sig offline instead of scanning")
    ap.add_argument("--public-key", type=Path, action="append",
                    help="PEM public key to verify with (repeatable)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse, scan every model (or check signatures), print, return the exit code."""
    args = _parser().parse_args(argv)
    if args.verify_signature:
        return verify_main(args)
    try:
        params = load_params(args.params)
        calibration_path = args.calibration or PROJECT / params.scan.calibration
        calibration = load_calibration(calibration_path, scan_settings(params))
        ref = _reference(params, args.reference)
        device = resolve_device(params.base.device)
    except (ConfigError, CalibrationError, DataError, OSError) as err:
        print(f"error: {escape(err)}", file=sys.stderr)
        return EXIT["error"]
    records = [record(str(folder), None, reason) | {"verdict": "error"}
               for folder, reason in empty_folders(args.paths)]
    for stem in model_stems(args.paths):
        try:
            records.append(scan_one(stem, ref, params, calibration, device, args.repair))
        except Exception as err:  # noqa: BLE001 - one model's failure stops no other
            records.append(record(str(stem), None, f"{type(err).__name__}: {err}")
                           | {"verdict": "error"})
    if args.format == "json":
        print(json.dumps(records, indent=2))
    elif args.format == "sarif":
        print(json.dumps(sarif.log(records, _version()), indent=2))
    else:
        for rec in records:
            print(text_line(rec))
    return max((EXIT[r["verdict"]] for r in records), default=EXIT["clean"])


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mesa-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def entry() -> None:
    """Console script `mesa-scan` (pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

"""One defence for every product: repair what a scan found, then verify before anyone trusts it.

The scan flags one or more target classes; for each, the detector that fired recovers a trigger
and its geometry (`Recovered`: mesa_lib.geometry). The repair then fine-tunes the model on the
defender's images, a share of each batch carrying triggers of every flagged target, labels kept
TRUE (mesa_lib.repair), where the triggers come from `method`:

- `mesa`: MESA's staircase of generators (Qiao et al., NeurIPS 2019, Sec. 4) fitted over the
  recovered geometry: patterns of the recovered patch's size at its place or anywhere, or full-
  image patterns through a recovered blend mask. The paper's 3x3-anywhere is one such geometry.
- controls in the same budget: `unlearn` (the one recovered trigger, Neural Cleanse's
  unlearning, Wang et al. S&P 2019), `finetune` (no trigger), `random` (uniform random patterns
  of the same geometry).

The defender's reference images are cut into three disjoint parts (`split`): `selection` (the
triggers are recovered and their geometry measured there), `repair` (MESA's fit and the fine-
tuning) and `verification` (never seen by the repair, nor by the scan that flagged the model).
`defend` measures on the verification part, before and after, the clean accuracy and each
recovered trigger's attack success (a recovered patch also at the image's corners, edge middles
and centre: `mesa_lib.geometry.probes`), and re-scans there; the model passes only if the
re-scan is clean with a p-value of at least `min_rescan_p`, no recovered trigger keeps more than
`max_residual` ASR at its place or any probe place, and accuracy fell by at most
`max_accuracy_drop`. Anything else is a failed
repair with its reason: never cleared. Why a p-value bar above the scan's own alpha: a repaired
model was backdoored a minute ago, so "not flagged" is too weak; it must look like a typical
clean model. The recovered trigger's residual cannot stand in for this: a repair can remove the
trigger the search recovered while the planted one, which the search found only part of, keeps
working (docs/repair.md gives the selection figures).

Rounds (`rounds` > 1): the search recovers *a* trigger, not always the planted one (a corner
patch recovered as a spread mask, a patch recovered a few pixels off). After a round, `again`
looks at the repaired model (the scan service re-scans it on the selection part) and recovers
the triggers of the classes that still stand out; the next round stamps every round's triggers.
The verification measures all of them, against the model as it arrived and as it leaves.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from mesa_lib.distribution import MaskTrigger, UniformPatch
from mesa_lib.evaluate import accuracy
from mesa_lib.geometry import Family, Mixture, Placed, Recovered, probes
from mesa_lib.mesa import MesaCallback, MesaConfig, fit_mesa
from mesa_lib.repair import RepairConfig, repair
from mesa_lib.train import EpochCallback
from mesa_lib.verdict import Verdict

METHODS = ("mesa", "unlearn", "finetune", "random")


@dataclass(frozen=True)
class DefenceConfig:
    """The repair and what it must reach to be trusted.

    Attributes:
        method: mesa | unlearn | finetune | random (module docstring).
        repair: the fine-tuning (epochs, lr, stamp rate, ...).
        mesa: MESA's fit over each recovered geometry (method `mesa`).
        mesa_images: repair images MESA is fitted on (0 = all).
        max_residual: highest ASR a recovered trigger may keep on the verification images.
        max_accuracy_drop: largest clean-accuracy loss on the verification images.
        min_rescan_p: smallest p-value the re-scan of the repaired model may give (0: the
            re-scan's verdict alone).
        rounds: most repair rounds (module docstring); a round runs only if `again` recovers
            a trigger after the previous one.
        again_p: a class whose re-scan p-value between rounds is below this stands out even
            when not flagged (read by the caller's `again`).
        recheck: between rounds, every target repaired so far stands out too, whatever the
            re-scan says (read by the caller's `again`): a repair can remove the recovered
            trigger and leave the true one working while the model looks clean.
    """

    method: str = "mesa"
    repair: RepairConfig = field(default_factory=RepairConfig)
    mesa: MesaConfig = field(default_factory=MesaConfig)
    mesa_images: int = 2048
    max_residual: float = 0.1
    max_accuracy_drop: float = 0.03
    min_rescan_p: float = 0.0
    rounds: int = 1
    again_p: float = 0.0
    recheck: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown repair method {self.method!r}; known: {METHODS}")
        if self.rounds < 1:
            raise ValueError(f"repair rounds must be >= 1, got {self.rounds}")

    def record(self) -> dict[str, Any]:
        """JSON-able settings for the audit record."""
        return {"method": self.method, "repair": asdict(self.repair),
                "mesa": {k: v for k, v in asdict(self.mesa).items() if v is not None},
                "mesa_images": self.mesa_images, "max_residual": self.max_residual,
                "max_accuracy_drop": self.max_accuracy_drop, "min_rescan_p": self.min_rescan_p,
                "rounds": self.rounds, "again_p": self.again_p, "recheck": self.recheck}


@dataclass(frozen=True)
class Splits:
    """Disjoint index sets into the reference images: int64 (n_part,) each, sorted."""

    repair: Tensor
    selection: Tensor
    verification: Tensor

    def sizes(self) -> dict[str, int]:
        """Images per part."""
        return {"repair": len(self.repair), "selection": len(self.selection),
                "verification": len(self.verification)}


def split(n: int, scanned: Tensor, verification: float, selection: float, seed: int,
          minimum: int = 20) -> Splits:
    """Cut n reference images into repair / selection / verification parts.

    Verification and selection are drawn (seeded) from the images the scan did NOT use; the
    repair part is everything else (the scanned images included).

    Args:
        scanned: int64 indices of the images the scan measured the model on.
        verification, selection: shares of the unscanned images in each part.

    Raises:
        ValueError: a part would hold fewer than `minimum` images.
    """
    used = torch.zeros(n, dtype=torch.bool)
    used[scanned] = True
    free = (~used).nonzero().squeeze(1)
    free = free[torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))]
    n_ver, n_sel = int(len(free) * verification), int(len(free) * selection)
    parts = {"verification": free[:n_ver], "selection": free[n_ver:n_ver + n_sel]}
    rest = torch.ones(n, dtype=torch.bool)
    for idx in parts.values():
        rest[idx] = False
    parts["repair"] = rest.nonzero().squeeze(1)
    _check_apart(parts, scanned)
    small = {k: len(v) for k, v in parts.items() if len(v) < minimum}
    if small:
        raise ValueError(f"{n} reference images ({len(scanned)} used by the scan) are too few "
                         f"to repair and verify: parts {small} hold fewer than {minimum}")
    return Splits(**{k: v.sort().values for k, v in parts.items()})


def _check_apart(parts: dict[str, Tensor], scanned: Tensor) -> None:
    """Refuse (not assume) overlapping parts, or verification images the scan saw."""
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if bool(torch.isin(parts[a], parts[b]).any()):
                raise RuntimeError(f"repair split: parts {a} and {b} overlap")
    if bool(torch.isin(parts["verification"], scanned).any()):
        raise RuntimeError("repair split: verification images were used by the scan")


@torch.no_grad()
def trigger_asr(model: nn.Module, images: Tensor, labels: Tensor, trigger: Family, target: int,
                device: torch.device, seed: int, chunk: int = 500) -> float:
    """Share of the images of other classes that `trigger` sends to `target`.

    Args:
        images: uint8 (N, C, H, W); labels: int64 (N,) true classes.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x_all = images[labels != target]
    hits = 0
    for start in range(0, len(x_all), chunk):
        x = trigger.apply(x_all[start:start + chunk].to(device).float().div_(255), gen)
        hits += int((model(x).argmax(1) == target).sum())
    return hits / max(len(x_all), 1)


@dataclass(frozen=True)
class Measures:
    """What the verification images say about a model: accuracy and each trigger's ASR."""

    accuracy: float
    asr: dict[int, float]  # flagged target -> its recovered triggers' highest ASR
    # flagged target -> the recovered patch's highest ASR at the probe places (corners, edge
    # middles, centre; mesa_lib.geometry.probes); targets without probes are left out
    moved: dict[int, float] = field(default_factory=dict)


def probes_of(found: Recovered) -> list[Family]:
    """The recovered trigger's crop at the probe places, for a mask + pattern trigger."""
    if not isinstance(found.trigger, MaskTrigger):
        return []
    return list(probes(found.trigger.mask, found.trigger.pattern, found.geometry))


def measure(model: nn.Module, images: Tensor, labels: Tensor, found: Sequence[Recovered],
            device: torch.device, seed: int) -> Measures:
    """Accuracy, every recovered trigger's ASR and its worst probe place's, on the given
    (verification) images (each trigger placed by the same seeded draws before and after a
    repair); a target with several triggers (rounds) gets the highest."""
    asr: dict[int, float] = {}
    moved: dict[int, float] = {}
    for r in found:
        hit = trigger_asr(model, images, labels, r.trigger, r.target, device, seed)
        asr[r.target] = max(hit, asr.get(r.target, 0.0))
        if places := probes_of(r):
            worst = max(trigger_asr(model, images, labels, f, r.target, device, seed)
                        for f in places)
            moved[r.target] = max(worst, moved.get(r.target, 0.0))
    return Measures(accuracy(model, images, labels, device), asr, moved)


def repair_family(method: str, model: nn.Module, images: Tensor, found: Recovered,
                  config: DefenceConfig, device: torch.device,
                  callback: MesaCallback | None = None) -> Family | None:
    """What the repair stamps for one flagged target (None: plain fine-tuning); `callback`
    receives MESA's per-epoch statistics (method `mesa`)."""
    shape = found.geometry.trigger_shape(images.shape[1])
    if method == "finetune":
        return None
    if method == "unlearn":
        return found.trigger
    if method == "random":
        return Placed(UniformPatch(shape), found.geometry)
    n = len(images) if config.mesa_images <= 0 else min(config.mesa_images, len(images))
    dist = fit_mesa(model, images[:n], found.target, shape, config.mesa, device, callback,
                    geometry=found.geometry)
    return Placed(dist, found.geometry)


@dataclass(frozen=True)
class Outcome:
    """A repair and its verification.

    Attributes:
        passed: the verification's decision; `reason` says why not.
        found: every recovered trigger, in the order the rounds recovered them.
        before, after: measures on the verification images.
        rounds: the repair rounds run.
        rescan: the calibrated verdict of the repaired model on the verification images.
    """

    passed: bool
    reason: str
    method: str
    found: tuple[Recovered, ...]
    before: Measures
    after: Measures
    rescan: Verdict | None
    settings: dict[str, Any]
    splits: dict[str, int]
    seconds: float
    rounds: int = 1

    @property
    def targets(self) -> list[int]:
        """The repaired target classes, each once, in the order they were found."""
        return list(dict.fromkeys(r.target for r in self.found))

    def record(self) -> dict[str, Any]:
        """JSON-able: the verification verdict, per-target residual ASR, accuracy, settings."""
        return {
            "verdict": "clean" if self.passed else "backdoored", "reason": self.reason,
            "method": self.method,
            "targets": [self._target_record(t) for t in self.targets], "rounds": self.rounds,
            "accuracy_before": self.before.accuracy, "accuracy_after": self.after.accuracy,
            "rescan": None if self.rescan is None else {
                "verdict": self.rescan.status, "target": self.rescan.target,
                "targets": list(self.rescan.targets), "p_value": self.rescan.p_value},
            "settings": self.settings, "images": self.splits, "seconds": self.seconds}

    def _target_record(self, target: int) -> dict[str, Any]:
        """One target: its triggers' detectors and geometries (one per round that recovered
        one) and the highest ASR among them before and after."""
        mine = [r for r in self.found if r.target == target]
        out = {"target": target, "detector": mine[0].detector,
               "geometry": mine[0].geometry.record(),
               "asr_before": self.before.asr[target], "asr_after": self.after.asr[target]}
        if len(mine) > 1:
            out["again"] = [{"detector": r.detector, "geometry": r.geometry.record()}
                            for r in mine[1:]]
        if target in self.after.moved:
            out |= {"asr_moved_before": self.before.moved[target],
                    "asr_moved_after": self.after.moved[target]}
        return out


def judge(before: Measures, after: Measures, rescan: Verdict | None,
          config: DefenceConfig) -> str:
    """'' if the repaired model may be trusted, else every reason it may not."""
    why = [f"repair left {after.asr[t]:.0%} of the recovered trigger's ASR for class {t} "
           f"(was {before.asr[t]:.0%}; limit {config.max_residual:.0%})"
           for t in sorted(after.asr) if after.asr[t] > config.max_residual]
    why += [f"repair left {after.moved[t]:.0%} ASR to the recovered trigger moved to the "
            f"image's edge or centre for class {t} (was {before.moved[t]:.0%}; limit "
            f"{config.max_residual:.0%})"
            for t in sorted(after.moved) if after.moved[t] > config.max_residual]
    drop = before.accuracy - after.accuracy
    if drop > config.max_accuracy_drop:
        why.append(f"repair cost {drop:.1%} of clean accuracy "
                   f"(limit {config.max_accuracy_drop:.0%})")
    if rescan is not None and rescan.status != "clean":
        why.append(f"the re-scan on the verification images still finds a backdoor "
                   f"(target {rescan.target}, p = {rescan.p_value:.3f})")
    elif rescan is None and config.min_rescan_p > 0:
        why.append(f"no re-scan of the repaired model to hold against the bar p >= "
                   f"{config.min_rescan_p}")
    elif rescan is not None and rescan.p_value < config.min_rescan_p:
        why.append(f"the re-scan on the verification images does not look like a clean "
                   f"model's (p = {rescan.p_value:.3f}, a repaired model needs p >= "
                   f"{config.min_rescan_p})")
    return "; ".join(why)


Again = Callable[[nn.Module, int], Sequence[Recovered]]
"""(repaired model, next round's number) -> the triggers recovered for the classes that still
stand out; empty: no further round."""


# Later rounds' seeds: far from the offsets of mesa_lib.seed.SEED_OFFSETS, which a run's other
# draws add to the same base seed.
ROUND_SEED_STRIDE = 1009


def round_config(config: RepairConfig, n: int) -> RepairConfig:
    """Round n's fine-tuning: round 1 is `config` itself; later rounds draw their own batches,
    stamps and triggers."""
    return replace(config, seed=config.seed + ROUND_SEED_STRIDE * (n - 1))


def defend(model: nn.Module, images: Tensor, labels: Tensor, splits: Splits,
           found: Sequence[Recovered], config: DefenceConfig, device: torch.device,
           rescan: Callable[[nn.Module, Tensor, Tensor], Verdict] | None = None,
           families: Sequence[Family | None] | None = None,
           callback: EpochCallback | None = None, again: Again | None = None) -> Outcome:
    """Repair `model` IN PLACE against every recovered trigger, then verify it.

    Args:
        model: the flagged classifier, float (B, C, H, W) in [0, 1] -> logits.
        images: the defender's reference images, uint8 (N, C, H, W); labels: int64 (N,).
        splits: disjoint parts of them (`split`).
        found: one `Recovered` per flagged target (recovered on the selection images).
        rescan: (model, images, labels) -> calibrated verdict; run on the verification images.
        families: what each target's repair stamps, when fitted beforehand on the repair part
            (the demo pipeline fits MESA in a stage of its own); default `repair_family`.
        callback: receives the fine-tuning's per-epoch statistics.
        again: between rounds (`config.rounds` > 1), the triggers still standing out; must not
            look at the verification images.
    """
    start = time.perf_counter()
    if not found:
        raise ValueError("nothing to repair: no flagged target was recovered")
    ver_x, ver_y = images[splits.verification], labels[splits.verification]
    rep_x, rep_y = images[splits.repair], labels[splits.repair]
    arrived = copy.deepcopy(model)  # "before" is measured on it, for every round's triggers
    found = list(found)
    if families is None:
        families = [repair_family(config.method, model, rep_x, r, config, device) for r in found]
    elif len(families) != len(found):
        raise ValueError(f"{len(families)} trigger families for {len(found)} flagged targets")
    families = list(families)
    rounds = 0
    for n in range(1, config.rounds + 1):
        if n > 1:
            new = list(again(model, n)) if again is not None else []
            if not new:
                break
            found += new
            families += [repair_family(config.method, model, rep_x, r, config, device)
                         for r in new]
        family = None if config.method == "finetune" else Mixture([f for f in families if f])
        repair(model, rep_x, rep_y, family, round_config(config.repair, n), device, callback)
        rounds = n
    before = measure(arrived, ver_x, ver_y, found, device, config.repair.seed)
    after = measure(model, ver_x, ver_y, found, device, config.repair.seed)
    verdict = rescan(model, ver_x, ver_y) if rescan is not None else None
    reason = judge(before, after, verdict, config)
    return Outcome(not reason, reason, config.method, tuple(found), before, after, verdict,
                   config.record(), splits.sizes(), time.perf_counter() - start, rounds)

"""What the zoo's reports share: a scan record's p-value and flagged classes against a
calibration, a truth record's targets, attack families, Wilson intervals and ROC-AUC
(tasks/zoo/detection_report.py, repair_report.py and transfer.py build their tables on these).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mesa_lib.calibration import Calibration, flagged_classes

Truth = dict[str, dict[str, Any]]


def class_scores(record: dict[str, Any]) -> dict[str, dict[int, float]]:
    """detector -> class -> score of a scan record (JSON keys back to ints)."""
    return {d: {int(c): v for c, v in s["scores"].items()}
            for d, s in record["detectors"].items()}


def p_value(calibration: Calibration, record: dict[str, Any]) -> tuple[float, str, int]:
    """(combined p-value, the detector with the smallest p, its suspected class) of a record."""
    stats = {d: calibration.statistic(d, s) for d, s in class_scores(record).items()
             if d in calibration.detectors}
    p, fired = calibration.combined({d: s[0] for d, s in stats.items()})
    return p, fired, stats[fired][1]


def flagged_targets(calibration: Calibration, record: dict[str, Any]) -> tuple[int, ...]:
    """Every class the scanner reports for a record (the product's verdict `targets`: the
    suspected class first, then each other class whose own statistic would flag the model);
    () when the model is not flagged."""
    stats = {d: calibration.statistic(d, s) for d, s in class_scores(record).items()
             if d in calibration.detectors}
    p, fired = calibration.combined({d: s[0] for d, s in stats.items()})
    if p > calibration.alpha:
        return ()
    return flagged_classes(stats, calibration, stats[fired][1])


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion hits / n."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def auc(positive: list[float], negative: list[float]) -> float:
    """ROC-AUC as P(score of a positive > score of a negative), ties counting one half."""
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def targets_of(truth: dict[str, Any]) -> list[int]:
    """Every target class a truth record's triggers were planted for (two with `also`)."""
    return truth.get("targets") or [truth.get("target")]


def attack_text(attack: dict[str, Any]) -> str:
    """A truth record's attack in a few words: a patch by its trigger, size, place and rate;
    any other attack by its name and settings."""
    if {"trigger", "size", "location"} <= set(attack) and attack["size"] < 32:
        return (f"{attack['trigger']} {attack['size']}x{attack['size']} at "
                f"{attack['location']}, rate {attack.get('rate')}")
    settings = ", ".join(f"{k} {v}" for k, v in attack.items() if k != "name")
    return f"{attack.get('name', 'attack')} ({settings})"


def families(truth: Truth) -> dict[str, Callable[[dict[str, Any]], bool]]:
    """Attack families: name -> predicate on a backdoored model's truth record. The patch
    families read a patch attack's settings (size, location, trigger, rate); an attack without
    them is in none of those; the whole-image attacks are named by their registry name."""
    def setting(t: dict[str, Any], key: str) -> Any:
        return t["attack"].get(key)

    def patch(t: dict[str, Any]) -> bool:
        return isinstance(setting(t, "size"), int) and setting(t, "size") < 32

    rows = {"patch attacks (all)": patch,
            "fixed place": lambda t: patch(t) and setting(t, "location") != "random",
            "random place": lambda t: patch(t) and setting(t, "location") == "random"}
    rows |= {f"size {k}x{k}": (lambda t, k=k: patch(t) and setting(t, "size") == k)
             for k in (2, 3, 4, 5)}
    rows |= {"black/white": lambda t: patch(t) and setting(t, "trigger") == "bw",
             "random colour": lambda t: patch(t) and setting(t, "trigger") == "random_color",
             "rate <= 3%": lambda t: patch(t) and setting(t, "rate") <= 0.03,
             "rate 5%": lambda t: patch(t) and setting(t, "rate") == 0.05,
             "rate >= 10%": lambda t: patch(t) and setting(t, "rate") >= 0.10,
             "planted while fine-tuning a base": lambda t: patch(t) and t.get("base") is not None,
             "planted while training from scratch": lambda t: patch(t) and t.get("base") is None,
             "ResNet-20": lambda t: patch(t) and t["arch"] == "resnet20",
             "blended (whole image)": lambda t: setting(t, "size") == 32,
             "warp (WaNet)": lambda t: setting(t, "name") == "wanet",
             "sinusoid (SIG)": lambda t: setting(t, "name") == "sig",
             "colour filter": lambda t: setting(t, "name") == "colour_filter",
             "low-frequency": lambda t: setting(t, "name") == "low_frequency",
             "two triggers, two targets": lambda t: len(targets_of(t)) > 1}
    # the other libraries' networks and ResNet-18, whatever the attack (issue 25); a row's
    # negatives for ROC-AUC and cross-entropy stay every clean model, as in every row
    rows |= {f"architecture {a}": (lambda t, a=a: t["arch"] == a)
             for a in sorted({t["arch"] for t in truth.values()} - {"resnet8", "resnet20"})}
    return rows | {"all backdoors": lambda t: True}

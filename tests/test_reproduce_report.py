"""The reproduction script's report: shard records merged into one table, judged against the floor.

benchmarks/reproduce_mesa.py takes hours; its results file is what issue readers act on, so the
arithmetic of that file (means over patterns, residual ASR minus the clean model's own ASR, the
epoch sweep) is checked here on hand-made shard records.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reproduce_mesa",
                                               ROOT / "benchmarks" / "reproduce_mesa.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)


def _row(pattern: int, method: str, asr: float, rate: float | None = None, **extra) -> dict:
    return {"pattern": pattern, "method": method, "rate": rate, "clean_acc": 0.75, "asr": asr,
            "asr_variants": asr / 2, "asr_per_variant": {"pattern7": asr / 2}, **extra}


def _shard(path: Path, pattern: int, floor: float, mesa: float, points: list[float]) -> Path:
    rows = [_row(pattern, "clean", floor), _row(pattern, "backdoored", 0.9),
            _row(pattern, "MESA ensemble", mesa, 0.5,
                 curve=[{"epoch": 2, "clean_acc": 0.7, "asr": mesa + 0.02}])]
    rows += [_row(pattern, "point (per start)", a, 0.5, start=i) for i, a in enumerate(points)]
    rows.append({"pattern": pattern, "method": "_fit", "fire": {"MESA beta=0.9": 0.8},
                 "mesa_log": [{"epoch": 1, "target_prob": [0.7], "mutual_info": [1.0],
                               "seconds": 1.0}]})
    args = {k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(reproduce.parse_args(["--model", "resnet8"])).items()}
    path.write_text(json.dumps({"command": "cmd", "device": "CPU", "device_type": "cpu",
                                "rows": rows, "times": {"repair": 10.0}, "wall_s": 1.0,
                                "args": args}))
    return path


def test_merged_report_judges_each_method_against_the_floor(tmp_path: Path) -> None:
    a = _shard(tmp_path / "a.json", 6, floor=0.04, mesa=0.05, points=[0.10, 0.30])
    b = _shard(tmp_path / "b.json", 19, floor=0.06, mesa=0.05, points=[0.08, 0.12])
    md = reproduce.merge([a, b], tmp_path, tag="t").read_text()
    assert (tmp_path / "reproduce_mesa_resnet8_2p_cpu_t.json").is_file()
    summary = md.split("## Mean over patterns")[1].split("## Per pattern")[0]
    table = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines()
             if line.startswith("| ")}
    # MESA: mean 0.05; residual minus floor +0.01 and -0.01 -> mean +0.0000, max +0.0100
    assert "| 0.0500 | 0.0500-0.0500 | +0.0000; +0.0100 | e2 0.0700 |" in table["MESA ensemble"]
    # point: 4 repairs, mean 0.15, gaps 0.06, 0.26, 0.02, 0.06 -> mean 0.10, max 0.26
    assert "| 0.1500 | 0.0800-0.3000 | +0.1000; +0.2600 |" in table["point (per start)"]
    assert "| 6 | point (per start) 1 | 0.5 | 0.7500 | 0.3000 |" in md  # per-start rows kept
    assert "| repair | 20.0 |" in md  # stage times summed over shards
    assert "--tag t`" in md

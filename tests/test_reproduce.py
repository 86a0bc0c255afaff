"""The reproduction: the split never leaks, the statistics, the report, the controls, NC."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from backdoor_fixture import CPU, TARGET, build_lab
from pipeline_fixture import write_archive

from mesa_lib.distribution import UniformPatch
from mesa_lib.masksearch import CleanseConfig, neural_cleanse
from mesa_lib.repair import repair_hook
from mesa_lib.stats import bootstrap_mean, paired_difference
from tasks.common.settings import ConfigError
from tasks.reproduce import protocol, verdicts
from tasks.reproduce.data import load_data
from tasks.reproduce.params import load_repro_params
from tasks.reproduce.paths import ran_with, repair_plan
from tasks.reproduce.report import (
    coverage,
    edge_note,
    method_table,
    methods,
    paired,
    paired_table,
    profile_section,
    profiles_table,
    residual,
    seeds_caveat,
    stale_reasons,
)
from tasks.reproduce.selection import choose, per_method, sweep_table

ROOT = Path(__file__).resolve().parents[1]
TINY = {"inject": {"prob": 0.2, "lr": 0.01, "epochs": 1, "batch_size": 32},
        "mesa": {"betas": [0.9, 0.5], "alpha": 0.1, "epochs": 1, "batch_size": 16, "lr": 0.001,
                 "trigger_noise": 0.1},
        "point": {"starts": 2, "epochs": 1, "lr": 0.1},
        "point_paper": {"starts": 3, "epochs": 1, "lr": 0.1},
        "cleanse": {"epochs": 2, "patience": 1, "asr_threshold": 0.5}}


def tiny_params(tmp: Path) -> Path:
    """reproduce/params.yaml shrunk to seconds, on a synthetic archive of 100 test images."""
    raw = yaml.safe_load((ROOT / "reproduce" / "params.yaml").read_text())
    raw["data"] = {"archive": str(write_archive(tmp / "tiny.tar.gz")), "split_seed": 0,
                   "n_defender": 60, "n_validation": 20}
    raw["model"] = {"arch": "resnet8", "width": 1, "epochs": 1, "batch_size": 32, "lr": 0.05}
    raw["grid"] = {"seeds": [0], "patterns": [3], "paper_seeds": [0], "paper_patterns": [3],
                   "tuning_seeds": [100], "tuning_patterns": [6], "clean_seeds": [0, 100],
                   "target": 0}
    raw["evaluate"] = {"variants": 2, "shifts": False}
    raw["selection"] = {"rates": [0.1, 0.5], "checkpoints": [1, 2],
                        "methods": ["MESA ensemble", "uniform patch"], "max_accuracy_drop": 1.0}
    repair = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "augment": False,
              "batch_size": 16, "sample_noise": 0.0}
    raw["profiles"] = {
        "paper": {**TINY, "repair": {"rate": 0.1, "epochs": 1, **repair}},
        "tuned": {**TINY, "repair": {"rate": "selected", "epochs": "selected", **repair}}}
    path = tmp / "reproduce" / "params.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def _rows(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images}


def test_evaluation_images_never_reach_fitting_repair_or_selection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.reproduce import cell, clean, report, selection

    params_path = tiny_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = load_repro_params(params_path)
    seen: dict[str, set[str]] = {}

    def spy(name: str, real):
        def wrapped(*args, **kwargs):
            images = next(a for a in args if isinstance(a, torch.Tensor)
                          and a.dtype == torch.uint8)
            seen.setdefault(name, set()).update(_rows(images))
            return real(*args, **kwargs)
        return wrapped

    for name in ("fit_mesa", "fit_point", "neural_cleanse", "repair"):
        monkeypatch.setattr(protocol, name, spy(name, getattr(protocol, name)))
    real_measure = protocol.measure

    def measure(model, part, *args, **kwargs):
        seen.setdefault(f"measure:{current[0]}", set()).update(_rows(part.images))
        return real_measure(model, part, *args, **kwargs)

    monkeypatch.setattr(protocol, "measure", measure)
    current = ["select"]
    for seed in params.grid.clean_seeds:
        clean.run_clean(params, seed)
    cell.run_cell(params, "select", 100, 6)
    selection.run_selection(params)
    current[0] = "tuned"
    cell.run_cell(params, "tuned", 0, 3)
    current[0] = "paper"
    cell.run_cell(params, "paper", 0, 3)

    data = load_data(params)
    evaluation, validation = _rows(data.evaluation.images), _rows(data.validation.images)
    assert len(evaluation) == 40 and len(validation) == 20
    for name in ("fit_mesa", "fit_point", "neural_cleanse", "repair"):
        assert seen[name] and not seen[name] & (evaluation | validation), name
    assert seen["measure:select"] == validation  # the selection reads validation only
    assert seen["measure:tuned"] == seen["measure:paper"] == evaluation

    text = report.run_report(params).read_text()
    assert "coverage: 1 patterns x 1 seeds" in text and "## Profile `paper`" in text
    assert "MESA ensemble" in text and "uniform patch" in text and "Neural Cleanse" in text
    assert "Left out" not in text  # every cell ran with the current params

    # A record from other settings is named and left out, not averaged in under the new label.
    changed = params.model_copy(update={"seed_offset": 1})
    text = report.run_report(changed).read_text()
    assert "Left out, run with settings other than the current params" in text
    assert "s0-p3 (seed_offset)" in text and "coverage: no cells yet" in text
    # Another clean model; the tuned repair fixed at what the selection chose: the tuned cell's
    # repair still matches (only the profile's text and the model differ), the paper's model not.
    raw = yaml.safe_load(params_path.read_text())
    chosen = yaml.safe_load(Path("reproduce/results/selection.json").read_text())["chosen"]
    raw["profiles"]["tuned"]["repair"].update(chosen)
    raw["model"]["epochs"] = 2
    params_path.write_text(yaml.safe_dump(raw))
    text = report.run_report(load_repro_params(params_path)).read_text()
    assert "s0-p3 (settings, model)" in text and "s0-p3 (model)" in text


def test_bootstrap_interval_on_known_data() -> None:
    flat = bootstrap_mean([0.3] * 12)
    assert flat.mean == pytest.approx(0.3) and flat.low == pytest.approx(0.3) == flat.high
    coin = bootstrap_mean([0.0, 1.0] * 50, seed=1)
    assert coin.mean == 0.5 and 0.39 < coin.low < 0.42 and 0.58 < coin.high < 0.61
    assert not coin.excludes_zero() or coin.low > 0
    d = paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])  # every cell 0.5 apart
    assert (d.mean, d.low, d.high) == pytest.approx((0.5, 0.5, 0.5)) and d.excludes_zero()
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0], [1.0, 2.0])


def test_bootstrap_by_seed_resamples_seeds_then_cells() -> None:
    # Two seeds whose cells agree within a seed: the seed is the unit of evidence. Resampling
    # seeds gives means 0, 0.5 or 1 (1/4, 1/2, 1/4), so the interval is [0, 1]; treating the six
    # cells as independent would claim about [0.17, 0.83].
    values, seeds = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], [0, 0, 0, 1, 1, 1]
    by_seed = bootstrap_mean(values, groups=seeds)
    flat = bootstrap_mean(values)
    assert (by_seed.mean, by_seed.low, by_seed.high) == (0.5, 0.0, 1.0)
    assert 0.1 < flat.low < 0.25 and 0.75 < flat.high < 0.9
    one_seed = bootstrap_mean([0.0, 1.0] * 50, groups=[7] * 100, seed=1)  # = the flat bootstrap
    assert 0.38 < one_seed.low < 0.43 and 0.57 < one_seed.high < 0.62
    uneven = bootstrap_mean([0.2, 0.4, 0.6, 0.8, 1.0], groups=["a", "b", "b", "b", "b"])
    assert uneven.mean == pytest.approx(0.6) and 0.2 <= uneven.low < uneven.high <= 1.0
    with pytest.raises(ValueError, match="one group per value"):
        bootstrap_mean([1.0, 2.0], groups=[0])


def _cell(pattern: int, seed: int, asr: dict[str, float]) -> dict:
    evaluation = {m: {"clean_acc": 0.7, "asr": a, "asr_variants": a / 2} for m, a in asr.items()}
    return {"pattern": pattern, "seed": seed, "evaluation": evaluation}


def test_report_arithmetic() -> None:
    cells = [_cell(3, 0, {"clean": 0.05, "backdoored": 0.9, "MESA ensemble": 0.06,
                          "uniform patch": 0.10}),
             _cell(9, 0, {"clean": 0.03, "backdoored": 0.8, "MESA ensemble": 0.05,
                          "uniform patch": 0.09})]
    assert coverage(cells) == "coverage: 2 patterns x 1 seeds"
    assert coverage(cells[:1] + [_cell(3, 1, {"clean": 0.1})]) == \
        "coverage: 1 patterns x 2 seeds"
    table = "\n".join(method_table(cells))
    # MESA: mean ASR 5.5%, residual (0.06-0.05, 0.05-0.03) -> mean 1.5 points
    assert "| MESA ensemble | 70.00 [70.00, 70.00] | 5.50 [" in table
    assert "| +1.50 [+1.00, +2.00] |" in table
    diff = paired(cells, "MESA ensemble", "uniform patch", "asr")
    assert diff.mean == pytest.approx(-0.04) and diff.high < 0
    # Cells of two seeds: the report's intervals resample seeds first.
    two = [_cell(p, seed, {"clean": 0.04, "MESA ensemble": 0.04 + 0.02 * seed}) for p in (3, 9)
           for seed in (0, 1)]
    gap = residual(two, "MESA ensemble")
    assert (gap.mean, gap.low, gap.high) == pytest.approx((0.01, 0.0, 0.02))


def test_paper_vs_tuned_pairs_the_cells_both_ran() -> None:
    settings = {"inject": {"lr": 0.001, "epochs": 10}, "repair": {"rate": 0.01}}
    paper = [dict(_cell(p, 0, {"clean": 0.04, "backdoored": 0.5, "MESA ensemble": 0.30}),
                  settings=settings, repair={"rate": 0.01, "epochs": 10}) for p in (3, 9)]
    tuned = [dict(_cell(p, 0, {"clean": 0.04, "backdoored": 0.9 + 0.02 * (p == 9),
                               "MESA ensemble": 0.05}),
                  settings={**settings, "inject": {"lr": 0.01, "epochs": 10},
                            "repair": {"rate": "selected"}},
                  repair={"rate": 0.5, "epochs": 10}) for p in (3, 9, 15)]
    text = "\n".join(profiles_table(paper, tuned))
    # pattern 15 has no paper cell: 2 pairs, 2 patterns x 1 seed
    assert "Cells both profiles ran: 2 (2 patterns, 1 seeds)" in text
    # the tuned profile's repair rate is the one it used, not 'selected'
    assert "inject.lr 0.001 -> 0.01; repair.rate 0.01 -> 0.5." in text
    assert "| backdoored: ASR | 50.00 [50.00, 50.00] | 91.00 [90.00, 92.00] | " \
        "+41.00 [+40.00, +42.00] |" in text
    assert "| MESA ensemble: ASR - floor | +26.00 [+26.00, +26.00] | +1.00 [+1.00, +1.00] | " \
        "-25.00 [-25.00, -25.00] |" in text
    assert "point mixture" not in text  # no cell has it
    assert profiles_table(paper, []) == []


def test_verdicts_follow_the_plan_fixed_before_the_grid() -> None:
    """t-interval on seed means primary, bootstrap beside it; met / not met / inconclusive;
    accuracy judged two-sided and one-sided; the rivals corrected with Holm."""
    ACC = 0.7  # noqa: N806 - every model's accuracy in _cell

    def cell(pattern: int, seed: int, mesa_asr: float, mesa_acc: float, floor: float) -> dict:
        c = _cell(pattern, seed, {"clean": 0.04, "backdoored": 0.9, "MESA ensemble": mesa_asr,
                                  "uniform patch": 0.5, "point mixture": mesa_asr + 0.001})
        c["evaluation"]["MESA ensemble"] |= {"clean_acc": mesa_acc,
                                              "floor_random_pattern": floor}
        return c

    good = [cell(p, s, 0.04 + 0.001 * s, ACC + 0.01 + 0.0001 * s, 0.04) for s in range(4)
            for p in (3, 9)]
    judged = {j.label.split(" (")[0].split(",")[0]: j for j in verdicts.judge(good)}
    floor = judged["MESA's residual over the repaired model's own floor"]
    assert floor.verdict == "met" and floor.primary.n == 4  # the unit is the seed
    acc = [j for j in verdicts.judge(good) if j.label.startswith("accuracy")]
    assert [j.verdict for j in acc] == ["not met", "met"]  # +1 point: two- vs one-sided
    spread = [cell(p, s, 0.04, ACC + 0.003 + 0.003 * (p == 9), 0.04) for s in range(4)
              for p in (3, 9)]  # every seed +0.45 points, the cells +0.3 and +0.6
    acc = [j for j in verdicts.judge(spread) if j.label.startswith("accuracy")][0]
    assert acc.verdict == "inconclusive (the bootstrap disagrees)"  # t says in, cells across
    rivals = {r: v for r, _, _, v in verdicts.rivals(good)}
    assert rivals["uniform patch"] == "MESA better"
    assert rivals["point mixture"].startswith("MESA better")  # -0.1 points, no spread
    noisy = [cell(3, s, 0.04 + (0.03 if s % 2 else -0.01), 0.7, 0.04) for s in range(4)]
    assert verdicts.judge(noisy)[0].verdict == "inconclusive"  # the interval straddles +0.5
    table = "\n".join(verdicts.table(good))
    assert "| uniform patch |" in table and "Holm" in table
    assert verdicts.table(good[:2]) == [
        "Verdicts: fewer than 2 seeds hold MESA's figures; none stated."]


def test_holm_and_the_t_interval() -> None:
    from mesa_lib.stats import holm, t_interval

    assert holm([0.01, 0.04, 0.03, 0.2]) == [True, False, False, False]
    assert holm([0.001, 0.01, 0.02]) == [True, True, True]
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert (iv.low, iv.high) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5),
                                              abs=1e-3)
    assert iv.p_value == pytest.approx(0.0742, abs=1e-3)  # t = 2 / (1 / sqrt 3), 2 df


def test_the_staircase_table_counts_cells_reaching_their_beta() -> None:
    cells = [{"settings": {"mesa": {"betas": [0.9, 0.5]}}, "fits": {"mesa_log": [
        {"target_prob": [0.8, 0.4], "mutual_info": [1.0, 1.0]},
        {"target_prob": [tp, 0.6], "mutual_info": [1.0 + rise, 1.01]}]}}
        for tp, rise in ((0.95, 0.1), (0.85, 0.01))]
    assert verdicts.staircase(cells) == [
        "| sub-model | reached its beta (cells) | MINE converged (cells) |", "|---|---|---|",
        "| beta=0.9 | 1 of 2 | 1 of 2 |", "| beta=0.5 | 2 of 2 | 2 of 2 |"]


def test_a_partial_grid_says_so() -> None:
    cells = [{**_cell(3, 0, {"clean": 0.05, "backdoored": 0.9, "MESA ensemble": 0.06}),
              "repair": {"rate": 0.5, "epochs": 10}, "seconds": {"total": 1.0},
              "fits": {"breadth": {}}}]
    partial = "\n".join(profile_section("tuned", cells, planned=24))
    assert "coverage: 1 patterns x 1 seeds" in partial
    assert "Partial grid: 1 of the 24 planned cells." in partial
    assert "Partial grid" not in "\n".join(profile_section("tuned", cells, planned=1))


def test_selection_picks_the_lowest_residual_within_the_accuracy_budget() -> None:
    def sweep(rate, epoch, asr, acc):
        return {"method": "m", "rate": rate, "epoch": epoch, "asr": asr, "clean_acc": acc}

    cells = [{"profile": "select", "seed": 100, "pattern": 6,
              "validation": {"clean": {"asr": 0.05}, "backdoored": {"clean_acc": 0.80}},
              "sweep": [sweep(0.1, 2, 0.20, 0.80), sweep(0.1, 4, 0.10, 0.80),
                        sweep(0.5, 2, 0.06, 0.79), sweep(0.5, 4, 0.05, 0.70)]}]
    table = sweep_table(cells)
    assert table[(0.5, 4)]["residual"] == pytest.approx(0.0)
    assert table[(0.5, 4)]["drop"] == pytest.approx(0.10)
    chosen = choose(cells, max_drop=0.02)["chosen"]
    assert chosen == {"rate": 0.5, "epochs": 2}  # 0.5/4 is better but costs 10 points
    assert choose(cells, max_drop=0.2)["chosen"] == {"rate": 0.5, "epochs": 4}


def test_per_method_splits_the_selection_mean_by_method() -> None:
    def row(method, asr):
        return {"method": method, "rate": 0.5, "epoch": 10, "asr": asr, "clean_acc": 0.8}

    cells = [{"validation": {"clean": {"asr": 0.04}, "backdoored": {"clean_acc": 0.79}},
              "sweep": [row("MESA ensemble", 0.05), row("uniform patch", 0.70),
                        {**row("MESA ensemble", 0.9), "epoch": 2}]},
             {"validation": {"clean": {"asr": 0.02}, "backdoored": {"clean_acc": 0.79}},
              "sweep": [row("MESA ensemble", 0.05), row("uniform patch", 0.74)]}]
    split = per_method(cells, 0.5, 10)
    assert split["MESA ensemble"]["residual"] == pytest.approx(0.02)  # (0.01 + 0.03) / 2
    assert split["uniform patch"]["residual"] == pytest.approx(0.69)
    assert split["uniform patch"]["drop"] == pytest.approx(-0.01)
    assert split["uniform patch"]["n"] == 2


def test_uniform_patch_range_and_placement() -> None:
    patches = UniformPatch((3, 4, 4)).sample(500, torch.Generator().manual_seed(0))
    assert patches.shape == (500, 3, 4, 4) and 0 <= patches.min() and patches.max() <= 1
    assert 0.45 < patches.mean() < 0.55 and patches.std() > 0.25
    x = torch.full((64, 3, 16, 16), -1.0)  # outside [0, 1]: every stamped pixel shows
    out, _ = repair_hook(UniformPatch((3, 4, 4)), 1.0, seed=0)(x, torch.zeros(64), None)
    changed = (out != -1).any(1)  # (N, H, W)
    rows, cols = changed.any(2), changed.any(1)
    assert int(changed.sum()) == 64 * 16  # one 4x4 patch per image, fully inside
    assert all(int(r.sum()) == 4 and int(c.sum()) == 4 for r, c in zip(rows, cols, strict=True))
    firsts = {int(r.nonzero()[0]) for r in rows}
    assert len(firsts) > 5  # random places, not one


def test_neural_cleanse_keeps_its_best_mask_and_flags_the_target() -> None:
    lab = build_lab(backdoor=True, classes=10, n_train=6000)  # MAD needs ~10 classes
    # Measured under three CPU kernels (ATEN_CPU_CAPABILITY avx512 / avx2 / default): the
    # target's mask 7.7-8.7 pixels against 23-36 for the others, its anomaly index -1.74 to
    # -2.03 (NC's own threshold, 2, sits inside that range), the others' >= -0.19. The flag is
    # tested at 1.5, between the two with room on both sides.
    config = CleanseConfig(epochs=20, batch_size=64, lr=0.1, asr_threshold=0.95, patience=5,
                           init_cost=1e-2, anomaly_threshold=1.5)
    res = neural_cleanse(lab.model, lab.defender_x[:512], 10, config, CPU)
    assert res.flagged == (TARGET,) and int(res.anomaly.argmin()) == TARGET, res.anomaly
    assert res.asr[TARGET] >= 0.95 and res.l1[TARGET] < 15  # the 3x3 trigger has 9 pixels
    # the kept mask is NC's own best: the smallest L1 among the epochs that reached the ASR
    l1, asr = res.history[:, 0], res.history[:, 1]
    won = (asr >= 0.95).any(0)
    best = torch.where(asr >= 0.95, l1, torch.inf).min(0).values
    assert won[TARGET] and torch.allclose(res.l1[won], best[won])
    assert res.epochs == len(res.history)
    assert not torch.allclose(res.l1, l1[-1])  # which the last iterate is not


def test_the_gpu_profile_changes_the_scale_only() -> None:
    cpu = load_repro_params(ROOT / "reproduce" / "params.yaml")
    gpu = load_repro_params(ROOT / "reproduce" / "params-gpu.yaml")
    assert gpu.model.arch == "resnet18"
    tuning = set(gpu.grid.tuning_patterns)
    assert set(gpu.grid.patterns) == set(range(51)) - tuning  # none the selection tuned on
    assert set(gpu.grid.paper_patterns) <= set(gpu.grid.patterns)  # paired with tuned cells
    same = ("seed_offset", "data", "evaluate", "selection", "profiles")
    assert all(getattr(gpu, key) == getattr(cpu, key) for key in same)
    assert gpu.grid.model_dump(exclude={"patterns"}) == cpu.grid.model_dump(exclude={"patterns"})


def test_the_tables_hold_every_repaired_model_the_cells_have() -> None:
    cells = [_cell(3, 0, {"clean": 0.05, "backdoored": 0.9, "MESA ensemble": 0.06,
                          "MESA beta=0.5": 0.07, "MESA beta=0.95": 0.08, "point start 10": 0.1,
                          "point start 2": 0.1, "Neural Cleanse": 0.2, "no trigger": 0.9})]
    assert methods(cells) == ["no trigger", "point start 2", "point start 10", "Neural Cleanse",
                              "MESA beta=0.95", "MESA beta=0.5", "MESA ensemble"]
    assert "| MESA beta=0.95 | -2.00 [" in "\n".join(paired_table(cells))  # a beta set by -S


def test_a_choice_on_the_border_of_the_sweep_is_said() -> None:
    params = load_repro_params(ROOT / "reproduce" / "params.yaml")
    rates, epochs = params.selection.rates, params.selection.checkpoints
    both = edge_note(params, max(rates), min(epochs))
    assert "largest stamp rate swept (0.5) and the fewest repair epochs swept (2)" in both
    assert "most repair epochs swept (10)" in edge_note(params, 0.1, max(epochs))
    assert edge_note(params, 0.1, 4) == ""  # inside the sweep on both axes


def test_a_pattern_the_selection_tuned_on_is_never_reported(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "reproduce" / "params.yaml").read_text())
    raw["grid"]["paper_patterns"] = [*raw["grid"]["paper_patterns"], 6]  # a tuning pattern
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"grid.tuning_patterns: must not be report patterns, "
                                          r"got \[6\]"):
        load_repro_params(path)


def test_a_cell_of_the_gpu_profile_runs_here_at_tiny_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU profile's network through the real clean-model and cell code (on CPU, tiny data)."""
    from tasks.common.io import read_json
    from tasks.reproduce import cell, clean

    gpu = yaml.safe_load((ROOT / "reproduce" / "params-gpu.yaml").read_text())
    path = tiny_params(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["arch"] = gpu["model"]["arch"]
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    params = load_repro_params(path)
    clean.run_clean(params, 0)
    assert read_json(Path("reproduce/models/clean-s0.json"))["architecture"] == "resnet18"
    record = read_json(cell.run_cell(params, "paper", 0, 3))
    assert {"clean", "backdoored", "MESA ensemble", "point mixture", "uniform patch",
            "Neural Cleanse", "b/w patch", "point mixture 3x1"} <= set(record["evaluation"])
    for figures in record["evaluation"].values():  # every model's own floors
        assert 0 <= figures["floor_no_trigger"] <= 1 and 0 <= figures["floor_random_pattern"] <= 1


def test_a_tuned_repair_set_by_hand_is_what_current_cells_ran(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "reproduce" / "params.yaml").read_text())
    raw["profiles"]["tuned"]["repair"].update({"rate": 0.3, "epochs": 4})  # no selection needed
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_repro_params(path)
    plan = repair_plan(params, "tuned")
    assert plan == {"rate": 0.3, "epochs": 4}
    record = {"settings": raw["profiles"]["tuned"], "repair": plan, "ran_with": ran_with(params)}
    assert stale_reasons(record, params, "tuned", plan) == []
    old = {**record, "repair": {"rate": 0.5, "epochs": 10}, "ran_with": {}}
    assert stale_reasons(old, params, "tuned", plan) == [
        "repair", "seed_offset", "data", "model", "evaluate", "target"]


def test_the_report_says_how_few_seed_draws_its_intervals_rest_on() -> None:
    cells = [_cell(p, s, {"clean": 0.05}) for p in (3, 9) for s in (0, 1, 2)]
    assert "resample 3 seeds, which allows only 10 distinct draws" in seeds_caveat(cells)
    assert "only 3 distinct draws" in seeds_caveat([c for c in cells if c["seed"] < 2])


def test_a_tuned_cell_without_a_selection_stops_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.reproduce import cell

    params = load_repro_params(tiny_params(tmp_path))
    monkeypatch.chdir(tmp_path)  # no clean model and no selection.json here
    with pytest.raises(SystemExit, match="selection.json missing: the tuned profile's repair"):
        cell.run_cell(params, "tuned", 0, 3)


def test_rerun_cells_are_compared_with_their_earlier_records(tmp_path: Path,
                                                              monkeypatch) -> None:
    from tasks.common.io import write_json
    from tasks.reproduce import reruns

    monkeypatch.chdir(tmp_path)
    old = {**_cell(3, 0, {"clean": 0.04, "MESA ensemble": 0.05}), "ran_with": {"a": 1}}
    write_json(Path("reproduce/results/earlier/tuned/s0-p3.json"), old)
    new = {**_cell(3, 0, {"clean": 0.04, "MESA ensemble": 0.07, "b/w patch": 0.5}),
           "ran_with": {"a": 1}}
    other = {**_cell(9, 0, {"MESA ensemble": 0.9}), "ran_with": {"a": 1}}  # no earlier record
    rows = reruns.table("tuned", [new, other])
    assert "(1 cells;" in rows[0]
    assert "| MESA ensemble | +2.00 | +2.00 | +0.00 | +0.00 |" in rows
    assert not any(r.startswith("| b/w patch") for r in rows)  # new rows have nothing to match
    other_settings = reruns.table("tuned", [{**new, "ran_with": {"a": 2}}])
    assert other_settings[0].startswith("Not compared") and "s0-p3" in other_settings[0]
    assert reruns.table("tuned", [other]) == []  # nothing to compare with

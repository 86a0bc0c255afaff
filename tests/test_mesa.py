"""Evidence that MESA, its baselines, repair and detection work, on a tiny CPU backdoor.

The MESA fits here use a reduced but otherwise faithful configuration (hidden 128 instead of 512,
batch 64, lr 1e-3, about 400 steps) so that the whole file runs in well under a minute.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from backdoor_fixture import CPU, TARGET, TRIGGER, Lab, build_lab
from torch import nn

from mesa_lib.baselines import PointConfig, fit_point
from mesa_lib.detect import DetectConfig, decide, detect, split_holdout
from mesa_lib.distribution import ConstantSampler, PointDistribution, TriggerDistribution
from mesa_lib.generator import TriggerGenerator
from mesa_lib.masksearch import CleanseConfig, neural_cleanse
from mesa_lib.mesa import MesaConfig, fit_mesa, target_probability
from mesa_lib.metrics import (
    anomaly_index,
    backdoor_report,
    held_out_variants,
    knn_entropy,
    mean_pairwise_distance,
    other_patterns,
)
from mesa_lib.mine import Mine
from mesa_lib.repair import RepairConfig, repair, repair_hook
from mesa_lib.triggers import DEMO_PATTERN

FAST = MesaConfig(betas=(0.9, 0.5), epochs=50, batch_size=64, hidden=128, mine_hidden=128,
                  lr=1e-3)
SHAPE = (3, 3, 3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine run far faster single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lab() -> Lab:
    return build_lab(backdoor=True)


@pytest.fixture(scope="module")
def clean_lab() -> Lab:
    return build_lab(backdoor=False)


def _fit(lab: Lab, **overrides) -> TriggerDistribution:
    cfg = MesaConfig(**{**FAST.__dict__, **overrides})
    return fit_mesa(lab.model, lab.defender_x[:512], TARGET, SHAPE, cfg, CPU)


@pytest.fixture(scope="module")
def mesa(lab: Lab) -> TriggerDistribution:
    return _fit(lab)


@torch.no_grad()
def _probs(lab: Lab, triggers: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """Target probability of each trigger (n, C, h, w), averaged over 16 held images: (n,)."""
    n = len(triggers)
    x = lab.test_x[:16].float() / 255
    trig = triggers[:, None].expand(n, 16, *SHAPE)
    s = target_probability(lab.model, x, trig, torch.full((n,), TARGET),
                           torch.Generator().manual_seed(seed))
    return s.mean(1)


# ----------------------------------------------------------------------- batched building blocks


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 5, 5), (3, 3, 3)])
def test_generator_is_shape_generic_and_equals_separate_submodels(shape):
    g = TriggerGenerator(3, shape, hidden=32, generator=torch.Generator().manual_seed(0))
    z = g.sample_noise(8, torch.Generator().manual_seed(1))
    out = g.train()(z)
    assert out.shape == (3, 8, *shape) and 0 <= out.min() and out.max() <= 1
    # Sub-model 1 alone (sliced parameters, its own BatchNorm statistics) gives the same output.
    one = TriggerGenerator(1, shape, hidden=32)
    state = {k: (v[1:2] if "fcs" in k else v.view(3, -1)[1]) for k, v in g.state_dict().items()}
    one.load_state_dict(state)
    torch.testing.assert_close(one.train()(z[1:2]), out[1:2])
    assert not torch.allclose(out[0], out[1])


def test_mine_estimates_dependence_per_submodel():
    gen = torch.Generator().manual_seed(0)
    mine = Mine(2, 4, 4, hidden=64, generator=gen)
    opt = torch.optim.Adam(mine.parameters(), lr=1e-3)
    for _ in range(150):
        z = torch.rand(2, 128, 4, generator=gen)
        y = torch.stack([z[0] * 2 - 1, torch.rand(128, 4, generator=gen)])  # dependent, not
        est = mine(z, y, gen, update_ema=True)
        opt.zero_grad()
        (-est.surrogate.sum()).backward()
        opt.step()
    assert est.bound.shape == (2,) and torch.isfinite(mine.log_ema).all()
    assert est.bound[0] > 0.5 and est.bound[1] < 0.15


def test_all_submodels_share_one_classifier_forward(lab):
    calls = []

    class Counting(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(len(x))
            return self.inner(x)

    cfg = MesaConfig(betas=(0.9, 0.8, 0.5), epochs=1, batch_size=32, hidden=32, mine_hidden=32)
    dist = fit_mesa(Counting(lab.model), lab.defender_x[:64], [0, 1], SHAPE, cfg, CPU)
    assert calls == [2 * 3 * 32] * 2  # 2 steps, each ONE forward of targets x betas x batch
    assert dist.n_models == 6 and dist.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(dist.betas, torch.tensor([0.9, 0.8, 0.5] * 2))
    # The freeze is undone module by module: the wrapper is back in training mode, the
    # classifier inside stays in eval mode with its gradients on.
    assert Counting(lab.model).training and not any(m.training for m in lab.model.modules())
    assert all(p.requires_grad for p in lab.model.parameters())


# ------------------------------------------------------------------------------- the staircase


class MeanBrightness(nn.Module):
    """Analytic 2-class model: on black images, s = sigmoid(10 * (mean trigger value - 0.5))."""

    def forward(self, x):
        m = x.sum((1, 2, 3)) / 27
        return torch.stack([10 * (m - 0.5), torch.zeros_like(m)], 1)


def test_each_beta_fills_its_own_step():
    images = torch.zeros(256, 3, 6, 6, dtype=torch.uint8)
    cfg = MesaConfig(betas=(0.9, 0.5), epochs=12, batch_size=64, hidden=64, mine_hidden=64,
                     lr=2e-3)
    dist = fit_mesa(MeanBrightness(), images, 0, SHAPE, cfg, CPU)
    gen = torch.Generator().manual_seed(0)
    s, breadth = [], []
    for i, beta in enumerate((0.9, 0.5)):
        smp = dist.sample_submodel(i, 256, gen)
        si = torch.sigmoid(10 * (smp.mean((1, 2, 3)) - 0.5))
        assert (si > beta - 0.05).float().mean() > 0.8  # samples reach their beta
        s.append(float(si.mean()))
        breadth.append(mean_pairwise_distance(dist.sample_submodel(i, 256, gen, noise=False)))
    assert s[0] > s[1] + 0.1 and breadth[1] > breadth[0]  # lower step: lower s, wider spread


# --------------------------------------------------------------------- MESA on a real backdoor


def test_samples_fire_the_backdoor_near_their_beta(lab, mesa):
    gen = torch.Generator().manual_seed(0)
    for i, beta in enumerate((0.9, 0.5)):
        s = _probs(lab, mesa.sample_submodel(i, 128, gen))
        assert s.median() > beta - 0.1, (i, s.median())
    random = _probs(lab, torch.rand(128, *SHAPE, generator=gen))
    assert random.median() < 0.3


def test_without_the_hinge_samples_do_not_fire(lab, mesa):
    no_hinge = _fit(lab, hinge_weight=0.0, epochs=10)
    gen = torch.Generator().manual_seed(0)
    assert _probs(lab, no_hinge.sample(128, gen)).median() < 0.3
    assert _probs(lab, mesa.sample(128, gen)).median() > 0.7


def test_without_the_entropy_term_the_distribution_collapses(lab, mesa):
    greedy = _fit(lab, alpha=0.0)
    gen = torch.Generator().manual_seed(0)
    wide = mean_pairwise_distance(mesa.sample_submodel(0, 256, gen, noise=False))
    narrow = mean_pairwise_distance(greedy.sample_submodel(0, 256, gen, noise=False))
    assert narrow < 0.05 and wide > 5 * narrow, (wide, narrow)


def test_mesa_covers_more_valid_triggers_than_the_point_baseline(lab, mesa):
    point = fit_point(lab.model, lab.defender_x[:512], TARGET, SHAPE,
                      PointConfig(epochs=3, batch_size=64), CPU)
    assert isinstance(point, PointDistribution) and point.triggers.shape == (10, *SHAPE)
    pts = point.triggers[_probs(lab, point.triggers) > 0.7]
    assert len(pts) >= 2  # several starts found a working trigger ...
    gen = torch.Generator().manual_seed(0)
    smp = mesa.sample(256, gen, noise=False)
    smp = smp[_probs(lab, smp) > 0.7]
    # ... but (nearly) the same one, while MESA's working samples spread out.
    assert len(smp) > 128
    assert mean_pairwise_distance(smp) > max(0.15, 4 * mean_pairwise_distance(pts))


def test_repair_removes_the_backdoor_and_keeps_accuracy(lab, mesa):
    cfg = RepairConfig(epochs=5, batch_size=64, stamp_rate=0.1, augment=False)
    before = backdoor_report(lab.model, lab.test_x, lab.test_y, TRIGGER, TARGET, CPU)
    reports = {}
    for name, sampler in [("none", None), ("mesa", mesa), ("true", ConstantSampler(TRIGGER))]:
        model = repair(copy.deepcopy(lab.model), lab.defender_x, lab.defender_y, sampler, cfg,
                       CPU)
        reports[name] = backdoor_report(model, lab.test_x, lab.test_y, TRIGGER, TARGET, CPU)
    assert before["asr"] > 0.8
    assert reports["mesa"]["asr"] < before["asr"] / 10
    assert reports["none"]["asr"] > 4 * reports["mesa"]["asr"]  # not just fine-tuning
    assert reports["true"]["asr"] < 0.05
    assert reports["mesa"]["clean_acc"] > before["clean_acc"] - 0.03


def test_repair_hook_stamps_sampled_triggers_and_keeps_labels():
    x, y = torch.zeros(8, 3, 6, 6), torch.arange(8)
    hook = repair_hook(ConstantSampler(torch.ones(*SHAPE)), stamp_rate=1.0, seed=0)
    hx, hy = hook(x, y, torch.arange(8))
    assert torch.equal(hy, y) and torch.allclose(hx.sum((1, 2, 3)), torch.full((8,), 27.0))
    hx, _ = repair_hook(ConstantSampler(torch.ones(*SHAPE)), 0.0, 0)(x, y, torch.arange(8))
    assert torch.equal(hx, x)


# --------------------------------------------------------------------------------- detection


def test_detection_names_the_target_and_clears_a_clean_model(lab, clean_lab):
    cfg = DetectConfig(mesa=MesaConfig(betas=(0.8,), epochs=10, batch_size=64, hidden=128,
                                       mine_hidden=128, lr=3e-3), eval_images=512)
    bad = detect(lab.model, lab.defender_x, SHAPE, cfg, CPU, labels=lab.defender_y)
    good = detect(clean_lab.model, clean_lab.defender_x, SHAPE, cfg, CPU,
                  labels=clean_lab.defender_y)
    assert (bad.status, bad.target) == ("backdoored", TARGET), bad.per_class
    assert (good.status, good.target) == ("clean", None), good.per_class
    assert 0.5 < bad.confidence <= 1 and 0.5 < good.confidence <= 1
    assert bad.p_value is None and bad.detector == "mesa"  # uncalibrated
    assert set(bad.per_class["mesa"]) == set(range(6)) and "entropy" in bad.per_class["mesa"][0]


def test_decide_flags_only_a_high_outlier_and_keeps_the_evidence():
    cfg = DetectConfig()
    others = {c: {"asr": 0.01, "entropy": -1.0} for c in range(1, 6)}
    hijacked = decide({0: {"asr": 0.9, "entropy": 2.0}, **others}, cfg)
    assert (hijacked.status, hijacked.target) == ("backdoored", 0) and hijacked.confidence > 0.9
    scores = hijacked.per_class["mesa"]
    assert scores[0]["entropy"] == 2.0 and set(scores) == set(range(6))
    assert set(scores[3]) == {"asr", "entropy", "anomaly", "margin"}
    assert "class 0 is hijacked by 90%" in hijacked.reason
    for asr in ([0.0] * 6,  # nothing fires
                [0.9] * 6,  # everything fires: no outlier
                [0.2] + [0.0] * 5):  # an outlier, but below min_asr
        verdict = decide({c: {"asr": a} for c, a in enumerate(asr)}, cfg)
        assert (verdict.status, verdict.target) == ("clean", None), verdict.per_class


def test_split_holdout_mixes_class_sorted_data_and_is_seeded():
    images = torch.arange(120, dtype=torch.uint8).view(120, 1, 1, 1)  # pixel value = index
    labels = torch.arange(6).repeat_interleave(20)  # grouped by class, as archives often are
    fit, held, held_y = split_holdout(images, labels, 40, seed=3)
    assert (len(fit), len(held)) == (80, 40)
    assert sorted(torch.cat([fit, held]).flatten().tolist()) == list(range(120))  # a partition
    assert torch.equal(held_y, labels[held.flatten().long()])
    assert set(held_y.tolist()) == set(range(6))  # a tail of 40 would hold two classes
    again = split_holdout(images, labels, 40, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again, (fit, held, held_y), strict=True))
    assert not torch.equal(split_holdout(images, labels, 40, seed=4)[1], held)
    _, held, held_y = split_holdout(images, None, 1000, seed=3)
    assert len(held) == 60 and held_y is None  # at most half is held out


def test_neural_cleanse_runs_over_all_classes(lab):
    res = neural_cleanse(lab.model, lab.defender_x[:256], 6,
                         CleanseConfig(epochs=2, batch_size=64), CPU)
    assert res.masks.shape == (6, 1, 16, 16) and res.patterns.shape == (6, 3, 16, 16)
    assert res.l1.shape == res.anomaly.shape == (6,) and 0 <= res.masks.min()


# ----------------------------------------------------------------------- storage and metrics


def test_distribution_round_trips_through_tensors(mesa):
    tensors, config = mesa.to_tensors(), mesa.config()
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    import json

    back = TriggerDistribution.from_tensors(tensors, json.loads(json.dumps(config)))
    a = mesa.sample(32, torch.Generator().manual_seed(3))
    b = back.sample(32, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert back.betas.tolist() == mesa.betas.tolist() and back.gammas.sum() == 1
    only = mesa.submodel(1).sample(16, torch.Generator().manual_seed(4))
    torch.testing.assert_close(only, mesa.sample_submodel(1, 16, torch.Generator().manual_seed(4)))


def test_metrics_on_known_inputs():
    assert anomaly_index(torch.tensor([1.0, 1.1, 0.9, 1.0, 5.0]))[-1] > 20
    gen = torch.Generator().manual_seed(0)
    uniform = knn_entropy(torch.rand(2000, 2, generator=gen))  # true entropy of U[0,1]^2: 0
    assert abs(uniform) < 0.15
    gauss = knn_entropy(torch.randn(2000, 1, generator=gen))  # 0.5 log(2 pi e) = 1.419
    assert abs(gauss - 0.5 * math.log(2 * math.pi * math.e)) < 0.1
    near = other_patterns(torch.tensor(DEMO_PATTERN, dtype=torch.float), 3)
    assert len(near) == 3 and all(v.shape == SHAPE for v in near.values())
    variants = held_out_variants(torch.tensor(DEMO_PATTERN, dtype=torch.float), 3)
    assert {"contrast0.1", "tint_red"} <= set(variants) and len(variants) == 3 + 3 + 3

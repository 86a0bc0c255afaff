import pytest
import torch

from mesa_lib.poison import ATTACKS, build_attack
from mesa_lib.triggers import DEMO_PATTERN, pattern_trigger


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_registry_knows_both_attacks_and_rejects_unknown():
    assert {"badnets", "finetune_injection"} <= set(ATTACKS)
    with pytest.raises(ValueError, match="no_such_attack"):
        build_attack("no_such_attack", trigger=torch.ones(3, 3, 3))


def test_plug_in_attacks_are_found_by_their_entry_points():
    from mesa_lib.poison import attack_class, registered

    assert attack_class("wanet").name == "wanet"  # imports mesa_lib.globalattacks on first use
    assert {"sig", "wanet", "colour_filter", "low_frequency"} <= set(registered())
    with pytest.raises(ValueError, match="known: .*'sig'"):
        attack_class("no_such_attack")


def test_badnets_changes_exactly_the_recorded_indices():
    x, y = _data()
    attack = build_attack("badnets", trigger=pattern_trigger(DEMO_PATTERN), target=0, rate=0.1)
    ps = attack.poison_dataset(x, y)
    assert len(ps.indices) == round(0.1 * 180)  # rate of the 180 non-target images
    changed_rows = (ps.images != x).flatten(1).any(1) | (ps.labels != y)
    assert set(changed_rows.nonzero().squeeze(1).tolist()) <= set(ps.indices.tolist())
    assert (ps.labels[ps.indices] == 0).all() and (y[ps.indices] != 0).all()
    assert ps.images[ps.indices][:, :, 5:, 5:].eq(pattern_trigger(DEMO_PATTERN) * 255).all()
    assert torch.equal(x, _data()[0])  # input untouched


def test_badnets_is_a_function_of_seed_rate_and_trigger():
    x, y = _data()
    trig = pattern_trigger(DEMO_PATTERN)
    a = build_attack("badnets", trigger=trig, rate=0.2, seed=1, location="random")
    b = build_attack("badnets", trigger=trig, rate=0.2, seed=1, location="random")
    c = build_attack("badnets", trigger=trig, rate=0.2, seed=2, location="random")
    pa, pb, pc = (t.poison_dataset(x, y) for t in (a, b, c))
    assert torch.equal(pa.images, pb.images) and torch.equal(pa.indices, pb.indices)
    assert not torch.equal(pa.indices, pc.indices)


def test_finetune_injection_hook_poisons_at_its_rate_and_records_indices():
    trig = pattern_trigger(DEMO_PATTERN)
    attack = build_attack("finetune_injection", trigger=trig, target=3, prob=0.1, seed=0)
    hook = attack.batch_hook()
    total = 0
    for b in range(50):
        x = torch.rand(100, 3, 8, 8)
        y = torch.zeros(100, dtype=torch.long)
        idx = torch.arange(b * 100, (b + 1) * 100)
        x2, y2 = hook(x, y, idx)
        changed = (x2 != x).flatten(1).any(1)
        poisoned = y2 == 3
        assert torch.equal(changed & ~poisoned, torch.zeros_like(changed))
        total += int(poisoned.sum())
    recorded = torch.cat(attack.poisoned)
    assert len(recorded) == total and 350 < total < 650  # 10% of 5000
    # same seed, same poison
    again = build_attack("finetune_injection", trigger=trig, target=3, prob=0.1, seed=0)
    h2 = again.batch_hook()
    torch.manual_seed(0)
    x = torch.rand(100, 3, 8, 8)
    y = torch.zeros(100, dtype=torch.long)
    assert torch.equal(
        h2(x, y, torch.arange(100))[1],
        build_attack("finetune_injection", trigger=trig, target=3, prob=0.1, seed=0).batch_hook()(
            x, y, torch.arange(100)
        )[1],
    )

import torch
from torch import nn

from mesa_lib.evaluate import accuracy, attack_success_rate
from mesa_lib.poison import build_attack
from mesa_lib.train import EpochStats, TrainConfig, augment, train
from mesa_lib.triggers import pattern_trigger

CPU = torch.device("cpu")


def quadrant_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, 8, 8) noise with one bright 4x4 quadrant; the label is the quadrant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 100, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (n,), generator=g)
    for q in range(4):
        r, c = divmod(q, 2)
        x[y == q, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 120
    return x, y


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 4),
    )


def test_training_learns_a_tiny_problem_and_reports_each_epoch():
    x, y = quadrant_data(512, 0)
    xt, yt = quadrant_data(256, 1)
    torch.manual_seed(0)
    net = tiny_net()
    before = accuracy(net, xt, yt, CPU)
    seen: list[EpochStats] = []
    cfg = TrainConfig(epochs=6, batch_size=64, lr=0.05, augment=False)
    train(net, x, y, cfg, CPU, callback=lambda m, s: seen.append(s))
    assert [s.epoch for s in seen] == list(range(1, 7))
    assert seen[-1].loss < seen[0].loss and seen[-1].images_per_second > 0
    assert before < 0.5 and accuracy(net, xt, yt, CPU) > 0.9


def test_training_is_deterministic_for_a_seed():
    x, y = quadrant_data(128, 0)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = train(tiny_net(), x, y, TrainConfig(epochs=1, batch_size=32, lr=0.05), CPU)
        outs.append(net[0].weight.detach().clone())
    assert torch.equal(*outs)


def test_badnets_backdoor_is_learned_and_asr_counts_only_non_target_images():
    x, y = quadrant_data(1024, 0)
    xt, yt = quadrant_data(256, 1)
    trig = pattern_trigger([[1, 0], [0, 1]])
    attack = build_attack("badnets", trigger=trig, target=0, rate=0.3, location="corner")
    ps = attack.poison_dataset(x, y)
    torch.manual_seed(0)
    net = train(
        tiny_net(),
        ps.images,
        ps.labels,
        TrainConfig(epochs=25, batch_size=64, lr=0.05, augment=False),
        CPU,
    )
    corner = torch.tensor([6, 6])
    assert attack_success_rate(net, xt, yt, trig, 0, CPU, locations=corner) > 0.9
    assert accuracy(net, xt, yt, CPU) > 0.8
    # a model that always says 0: ASR 1 on non-target images; on target-only images nothing counts
    always0 = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    nn.init.zeros_(always0[1].weight)
    always0[1].bias.data = torch.tensor([5.0, 0, 0, 0])
    assert attack_success_rate(always0, xt, yt, trig, 0, CPU) == 1.0
    assert attack_success_rate(always0, xt[yt == 0], yt[yt == 0], trig, 0, CPU) == 0.0


def test_augment_keeps_shape_and_pixels_from_the_image():
    x = torch.rand(16, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert out.min() >= x.min() and out.max() <= x.max()

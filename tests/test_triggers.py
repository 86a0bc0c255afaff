import numpy as np
import pytest
import torch

from mesa_lib.triggers import (
    DEMO_PATTERN,
    canonical_patterns,
    load_patch,
    pattern_trigger,
    random_color_trigger,
    random_locations,
    stamp,
)


def test_there_are_exactly_51_canonical_3x3_patterns():
    pats = canonical_patterns(3)
    assert pats.shape == (51, 3, 3)
    assert set(pats.unique().tolist()) == {0.0, 1.0}


def test_patterns_are_closed_under_symmetry_and_cover_all_masks():
    pats = canonical_patterns(3).numpy().astype(np.uint8)
    keys = {p.tobytes() for p in pats}
    demo = np.array(DEMO_PATTERN, dtype=np.uint8)
    # every one of the 512 masks maps to exactly one representative
    covered = set()
    for bits in range(512):
        m = np.array([(bits >> i) & 1 for i in range(9)], dtype=np.uint8).reshape(3, 3)
        views = [np.rot90(f, k) for f in (m, np.fliplr(m)) for k in range(4)]
        views += [1 - v for v in views]
        hits = {v.tobytes() for v in views} & keys
        assert len(hits) == 1
        covered |= hits
    assert covered == keys
    # the demo pattern's class is there, and a pattern and its inverse share one class
    inv = {np.rot90(1 - demo, k).tobytes() for k in range(4)}
    assert inv & keys or {np.rot90(demo, k).tobytes() for k in range(4)} & keys
    assert canonical_patterns(2).shape == (4, 2, 2)  # 16 masks -> 4 classes


def test_stamp_overwrites_only_the_patch_at_each_location():
    imgs = torch.rand(4, 3, 8, 8)
    trig = pattern_trigger(DEMO_PATTERN)
    loc = torch.tensor([[0, 0], [5, 5], [2, 3], [0, 5]])
    out = stamp(imgs, trig, loc)
    assert out.shape == imgs.shape and out.dtype == imgs.dtype
    for i, (r, c) in enumerate(loc.tolist()):
        assert torch.equal(out[i, :, r : r + 3, c : c + 3], trig)
        mask = torch.ones(8, 8, dtype=torch.bool)
        mask[r : r + 3, c : c + 3] = False
        assert torch.equal(out[i][:, mask], imgs[i][:, mask])
    assert not torch.equal(out, imgs)  # input untouched, output new
    assert out.min() >= 0 and out.max() <= 1


def test_stamp_blends_and_handles_uint8_and_per_image_triggers():
    imgs = torch.zeros(2, 3, 6, 6, dtype=torch.uint8)
    out = stamp(imgs, torch.ones(3, 2, 2), torch.tensor([1, 1]), alpha=0.5)
    assert out.dtype == torch.uint8
    assert out[:, :, 1:3, 1:3].eq(128).all() and out.sum() == 2 * 3 * 4 * 128
    per_image = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    out = stamp(torch.full((2, 3, 6, 6), 0.5), per_image, torch.tensor([4, 4]))
    assert out[0, :, 4:, 4:].eq(0).all() and out[1, :, 4:, 4:].eq(1).all()


def test_stamp_is_differentiable_in_the_trigger():
    trig = torch.rand(3, 3, 3, requires_grad=True)
    out = stamp(torch.rand(5, 3, 8, 8), trig, random_locations(5, (8, 8), (3, 3)))
    out.sum().backward()
    assert torch.allclose(trig.grad, torch.full_like(trig, 5.0))


def test_stamp_rejects_out_of_image_locations_and_bad_shapes():
    with pytest.raises(ValueError, match="outside"):
        stamp(torch.rand(1, 3, 8, 8), torch.rand(3, 3, 3), torch.tensor([6, 0]))
    with pytest.raises(ValueError, match="does not match"):
        stamp(torch.rand(2, 3, 8, 8), torch.rand(1, 3, 3), torch.tensor([0, 0]))


def test_random_locations_are_seeded_and_inside():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_locations(100, (32, 32), (3, 3), g1), random_locations(100, (32, 32), (3, 3), g2)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 29


def test_random_color_and_loaded_patches(tmp_path):
    t = random_color_trigger(4, generator=torch.Generator().manual_seed(0))
    assert t.shape == (3, 4, 4) and 0 <= t.min() and t.max() <= 1
    np.save(tmp_path / "p.npy", np.array(DEMO_PATTERN, dtype=np.uint8) * 255)
    assert torch.equal(load_patch(tmp_path / "p.npy"), torch.tensor(DEMO_PATTERN).float()[None])
    from torchvision.io import write_png

    img = (torch.rand(3, 5, 7) * 255).to(torch.uint8)
    write_png(img, str(tmp_path / "p.png"))
    assert torch.allclose(load_patch(tmp_path / "p.png"), img.float() / 255)
    np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        load_patch(tmp_path / "obj.npy")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_patch(tmp_path / "missing.png")

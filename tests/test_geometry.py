"""Where a repair's triggers go (mesa_lib.geometry): a mask found as scattered specks is a blend
whose densest piece is also stamped at random places, so a patch backdoor the search found off
its real place is unlearned where it really sits too."""

from __future__ import annotations

import torch
from torch import nn

from mesa_lib.geometry import Geometry, GeometryConfig, densest_box, geometry_of


def _specks() -> torch.Tensor:
    """(1, 32, 32): a heavy 4x4 piece near the bottom-right corner and two light specks far
    away (the shape the mask search gave for a 4x4 corner patch of the calibration zoo)."""
    m = torch.zeros(1, 32, 32)
    m[0, 24:28, 27:31] = 0.9
    m[0, 8:10, 29:31] = 0.6
    m[0, 9, 15] = 0.6
    return m


def test_the_densest_box_is_the_heaviest_piece_widened_by_the_margin() -> None:
    box, share = densest_box(_specks(), margin=1)
    assert box == (23, 26, 6, 6)
    assert 0.75 < share < 0.85  # 16 * 0.9 of 19.2 in all


def test_a_speckled_mask_is_a_blend_with_its_densest_crop_spread() -> None:
    geometry = geometry_of(nn.Identity(), torch.rand(4, 3, 32, 32), _specks(),
                           torch.rand(3, 32, 32), 0, GeometryConfig(), torch.Generator())
    assert geometry.kind == "blend" and geometry.core == (23, 26, 6, 6)
    assert geometry.spread == GeometryConfig().spread
    assert geometry.record()["core"] == [23, 26, 6, 6]


def test_a_blend_stamps_its_crop_at_random_places_for_the_spread_share() -> None:
    mask = _specks()
    images, triggers = torch.full((400, 3, 32, 32), 0.5), torch.ones(400, 3, 32, 32)
    blended = (1 - mask) * images + mask * triggers
    still = Geometry("blend", (32, 32), (0, 0), 0.0, mask, {}, (23, 26, 6, 6))
    assert torch.equal(still.place(images, triggers), blended)
    moving = Geometry("blend", (32, 32), (0, 0), 0.5, mask, {}, (23, 26, 6, 6))
    out = moving.place(images, triggers, torch.Generator().manual_seed(0))
    moved = ~(out == blended).flatten(1).all(1)
    # a moved image carries exactly the 6x6 crop, opaque, and nothing of the blend
    assert torch.equal((out[moved] == 1).flatten(1).sum(1),
                       torch.full((int(moved.sum()),), 3 * 36))
    assert 160 < int(moved.sum()) < 240  # about half of 400
    places = {tuple((img[0] == 1).nonzero()[0].tolist()) for img in out[moved]}
    assert len(places) > 50  # spread over the image, not one place


def test_covering_places_reach_the_corners_as_often_as_the_middle() -> None:
    """Every pixel about equally covered: uniform top-left corners would cover a corner pixel
    25 times less often than a central one for a 5x5 patch."""
    from mesa_lib.geometry import covering_locations
    from mesa_lib.triggers import stamp

    loc = covering_locations(20000, (32, 32), (5, 5), torch.Generator().manual_seed(0))
    assert int(loc.min()) >= 0 and int(loc.max()) <= 27
    cover = stamp(torch.zeros(20000, 1, 32, 32), torch.ones(1, 5, 5), loc).mean(0)[0]
    corner, centre = float(cover[31, 31]), float(cover[16, 16])
    assert 0.5 < corner / centre < 2.0, (corner, centre)  # uniform corners: about 1/25


def test_a_recovered_patch_is_probed_at_the_corners_edges_and_centre() -> None:
    from mesa_lib.geometry import probe_places, probes

    assert probe_places((32, 32), (5, 6)) == [(r, c) for r in (0, 13, 27) for c in (0, 13, 26)]
    mask, pattern = torch.zeros(1, 32, 32), torch.zeros(3, 32, 32)
    mask[0, 10:15, 4:10], pattern[:, 10:15, 4:10] = 1.0, 0.25  # a 5x6 patch at (10, 4)
    patch = Geometry("patch", (5, 6), (10, 4), 0.5)
    found = probes(mask, pattern, patch)
    assert [p.place for p in found] == probe_places((32, 32), (5, 6))
    out = found[-1].apply(torch.ones(2, 3, 32, 32))  # the bottom-right corner
    assert torch.equal(out[:, :, 27:, 26:], torch.full((2, 3, 5, 6), 0.25))
    assert float(out.sum()) == 2 * (3 * 32 * 32 - 3 * 30 * 0.75)  # nothing else changed
    assert probes(mask, pattern, Geometry("patch", (5, 6))) == []  # anywhere: nothing to move

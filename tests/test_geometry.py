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

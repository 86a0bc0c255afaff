"""Tests for mesa_lib.models: shapes, parameter counts, in-model normalisation, registry."""

import pytest
import torch

from mesa_lib.models import MODELS, Normalize, build_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name: str) -> None:
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "params"),
    [("resnet18", 11_173_962), ("preact_resnet18", 11_171_146), ("resnet8", 78_042)],
)
def test_param_counts(name: str, params: int) -> None:
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet20_is_small() -> None:
    model = build_model("resnet20")
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6


def test_first_module_is_normalize() -> None:
    model = build_model("resnet8")
    first = next(model.children())
    assert isinstance(first, Normalize)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_normalisation_inside_model() -> None:
    model = build_model("resnet8").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.normalize.mean.add_(0.3)
        after = model(x)
    assert not torch.allclose(before, after)


def test_normalize_values() -> None:
    norm = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(norm(torch.ones(1, 3, 2, 2)), torch.full((1, 3, 2, 2), 2.0))


def test_width_kwarg_passes_through() -> None:
    narrow, wide = build_model("resnet8"), build_model("resnet8", width=2)
    assert wide.fc.in_features == 2 * narrow.fc.in_features


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="resnet18") as err:
        build_model("vgg99")
    assert "vgg99" in str(err.value)


def test_channels_last_matches_contiguous() -> None:
    model = build_model("resnet8").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, 10)
    assert torch.allclose(ref, out, atol=1e-5)

"""The reproduction's data: CIFAR-10 and the three-way protocol split of its test set."""

from __future__ import annotations

from dataclasses import dataclass

from mesa_lib.data import ImageSet, load_cifar, split_protocol
from tasks.common.env import CACHE_DIR, default_data_source
from tasks.reproduce.params import ReproParams


@dataclass(frozen=True)
class CellData:
    """The attacker's training set and the three parts of the test set."""

    train: ImageSet
    fit: ImageSet
    validation: ImageSet
    evaluation: ImageSet


def load_data(params: ReproParams) -> CellData:
    """CIFAR-10 with the protocol split of `data.split_seed`.

    One split for every cell, whatever its seed: the evaluation part is then the same 2,000
    images throughout, and no cell (the selection's included) ever fits, repairs or chooses on
    an image another cell reports on.
    """
    source = default_data_source() if params.data.archive == "auto" else params.data.archive
    data = load_cifar(source, "cifar10", CACHE_DIR)
    split = split_protocol(len(data.test), params.data.n_defender, params.data.n_validation,
                           params.data.split_seed)
    return CellData(data.train, data.test.subset(split.fit), data.test.subset(split.validation),
                    data.test.subset(split.evaluation))

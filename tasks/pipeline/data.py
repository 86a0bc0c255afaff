"""Tasks of the `data` stage and the data set-up step that fills `data/` for DVC.

`fetch_raw` (run by scripts/run_pipeline.sh before `dvc add data`, never by DVC) puts one archive
into `data/`: the file named by MESA_DATA_SOURCE if set, else the offline copy
../shared/datasets/cifar10-jpeg.tar.gz when it exists, else the canonical cifar-10-python.tar.gz
downloaded by torchvision.
The `data` stage then decodes whatever archive `data/` holds and writes the training subset and
the defender / held-out split of the test set to one npz.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task

from mesa_lib.cifar_archive import download_cifar
from mesa_lib.data import (
    DataError,
    ImageSet,
    data_fingerprint,
    load_cifar,
    split_defender,
)
from mesa_lib.seed import derive_seed
from tasks.common import catalog
from tasks.common.env import CACHE_DIR, DATA_SOURCE_ENV, OFFLINE_COPY, default_data_source
from tasks.common.io import save_npz
from tasks.common.params import Params
from tasks.common.rawdata import CANONICAL, archives_in


@task(retries=2, retry_delay_seconds=5)
def fetch_raw(data_dir: Path = catalog.DATA_DIR, name: str = "cifar10") -> Path:
    """Make sure data/ holds a raw archive; return it (I/O: downloads are retried).

    The source follows tasks.common.env.default_data_source: MESA_DATA_SOURCE, else the offline copy
    ../shared/datasets/cifar10-jpeg.tar.gz if present, else the canonical archive, downloaded.
    """
    log = get_run_logger()
    present = archives_in(data_dir)
    if present:
        log.info("data/ already holds %s", [p.name for p in present])
        return present[0]
    data_dir.mkdir(parents=True, exist_ok=True)
    source = default_data_source() if name == "cifar10" else data_dir / CANONICAL[name]
    if source.resolve().parent == data_dir.resolve():  # the canonical archive: download it
        log.info("downloading %s into %s/", CANONICAL[name], data_dir)
        try:
            return download_cifar(data_dir, name)
        except DataError as err:
            raise DataError(f"{err}; set {DATA_SOURCE_ENV}=/path/to/archive, e.g. the offline "
                            f"copy {OFFLINE_COPY}") from None
    if not source.exists():
        raise DataError(f"data source {source} ({DATA_SOURCE_ENV}) does not exist")
    log.info("copying %s into %s/", source, data_dir)
    if source.is_dir():
        return Path(shutil.copytree(source, data_dir / source.name))
    return Path(shutil.copyfile(source, data_dir / source.name))


def _split(part: ImageSet, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a seeded n-image subset of `part` and of the rest (via mesa_lib's split)."""
    tagged = ImageSet(part.images, torch.arange(len(part)), part.classes)
    chosen, rest = split_defender(tagged, n, seed)
    return chosen.labels, rest.labels


@task
def prepare_dataset(params: Params, archive: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Decode the archive, subset the training set, split the test set; save one npz.

    Output arrays: {train,defender,heldout}_{images uint8 (N,3,32,32), labels int64 (N,),
    index int64 (N,)} with indices into the raw train / test sets, and `classes`.

    Returns:
        (metrics: image counts, tags: archive name and data fingerprint).
    """
    p = params.data
    data = load_cifar(archive, p.name, CACHE_DIR)
    if p.n_defender >= len(data.test):
        raise DataError(f"data.n_defender: expected < {len(data.test)} (the test set), "
                        f"got {p.n_defender}")
    n_train = p.n_train or len(data.train)
    if n_train > len(data.train):
        raise DataError(f"data.n_train: expected <= {len(data.train)}, got {n_train}")
    seed = params.base.seed
    train_idx, _ = _split(data.train, n_train, derive_seed(seed, "train_subset"))
    def_idx, held_idx = _split(data.test, p.n_defender, derive_seed(seed, "defender_split"))
    arrays: dict[str, Any] = {"classes": list(data.train.classes)}
    for key, part, idx in (("train", data.train, train_idx), ("defender", data.test, def_idx),
                           ("heldout", data.test, held_idx)):
        sub = part.subset(idx)
        arrays |= {f"{key}_images": sub.images, f"{key}_labels": sub.labels, f"{key}_index": idx}
    save_npz(catalog.path("dataset"), arrays)
    metrics = {"raw_train": len(data.train), "raw_test": len(data.test), "train": len(train_idx),
               "defender": len(def_idx), "heldout": len(held_idx),
               "classes": len(data.train.classes)}
    return metrics, {"data.archive": archive.name, "data.fingerprint": data_fingerprint(data)}

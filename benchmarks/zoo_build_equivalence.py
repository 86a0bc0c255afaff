"""Build four zoo models at a reduced size with the code of the tree it is run from, and print a
hash of each model's weights with its truth figures: run it in two trees (a worktree at an
older commit, and this one) to show that a refactor leaves the zoo's models unchanged.

    git worktree add /tmp/before COMMIT && cd /tmp/before && ln -s "$OLDPWD/.venv" .venv
    .venv/bin/python "$OLDPWD/benchmarks/zoo_build_equivalence.py" /tmp/zoo-before ARCHIVE
    cd "$OLDPWD" && .venv/bin/python benchmarks/zoo_build_equivalence.py /tmp/zoo-now ARCHIVE

The models: test-r8-3 (a base), test-inj-03 and test-inj-14 (fine-tune injections into it) and
test-bn-03 (a BadNets whole-image blend from scratch), and one of each whole-image attack (SIG,
WaNet, colour filter, low-frequency), on 2,000 training images, 2 epochs from
scratch, 1 of fine-tuning. Entries are taken from the tree's own zoo/params.yaml, whatever its
format.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

MODELS = ("test-r8-3", "test-inj-03", "test-inj-14", "test-bn-03", "test-sig-00",
          "test-wanet-00", "test-filter-01", "test-lf-00")


def reduced(tree: Path, archive: str) -> dict:
    """The tree's zoo params with only MODELS, on less data and fewer epochs."""
    raw = yaml.safe_load((tree / "zoo" / "params.yaml").read_text())
    raw["data"] |= {"n_train": 2000, "archive": archive}
    raw["train"]["epochs"], raw["finetune"]["epochs"] = 2, 1
    for section, entries in raw.items():
        if section not in ("data", "train", "finetune") and isinstance(entries, dict):
            raw[section] = {k: v for k, v in entries.items() if k in MODELS}
    return raw


def main(out: Path, archive: str) -> None:
    tree = Path.cwd()
    (out / "zoo").mkdir(parents=True, exist_ok=True)
    (out / "zoo" / "params.yaml").write_text(yaml.safe_dump(reduced(tree, archive)))
    os.chdir(out)
    sys.path.insert(0, str(tree))
    from tasks.zoo import build
    from tasks.zoo.params import load_zoo_params

    params = load_zoo_params("zoo/params.yaml")
    for name in MODELS:
        truth = json.loads(build.run(params, name).read_text())
        weights = next(Path("zoo/models").rglob(f"{name}.safetensors"))
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        print(name, digest, truth["clean_accuracy"], truth["asr"])


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), str(Path(sys.argv[2]).resolve()))

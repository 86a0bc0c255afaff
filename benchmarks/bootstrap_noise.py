"""How much the reproduction's intervals depend on the bootstrap itself (docs/reproduction.md).

Usage:
    .venv/bin/python benchmarks/bootstrap_noise.py > benchmarks/results/bootstrap_noise.md

On the committed tuned cell records (reproduce/results/tuned/), for the residual ASR (ASR after
repair minus the clean model's own) of the MESA ensemble and the point mixture:
1. the report's interval (hierarchical: seeds, then cells within a seed) against a flat bootstrap
   over cells, which treats the cells of one clean model as independent;
2. the upper end of the hierarchical interval over resampling seeds 0-9, and with the same cells
   taken in file-name order instead of (seed, pattern) order: the Monte Carlo noise of a verdict
   judged at a threshold.
Pure arithmetic on JSON records: seconds, no model is run.
"""

from __future__ import annotations

from mesa_lib.stats import bootstrap_mean
from tasks.reproduce.paths import cells_of
from tasks.reproduce.report import floor_gap

POINTS = 100


def main() -> None:
    """Print the markdown table of both comparisons."""
    cells = cells_of("tuned")
    by_name = sorted(range(len(cells)), key=lambda i: f"s{cells[i]['seed']}-p{cells[i]['pattern']}")
    print(f"# Bootstrap noise of the reproduction's intervals ({len(cells)} tuned cells)\n")
    print("`.venv/bin/python benchmarks/bootstrap_noise.py`; residual ASR in points, on the "
          "evaluation split of the committed records (their repair setting was chosen on the "
          "selection cells' validation split; nothing here chooses anything). Arithmetic on JSON "
          "only, so the load on the machine does not matter.\n")
    print("| method | hierarchical (report) | flat over cells | upper end, resampling seeds 0-9 "
          "| upper end, file-name order |")
    print("|---|---|---|---|---|")
    for method in ("MESA ensemble", "point mixture"):
        values = [floor_gap(c, method) for c in cells]
        seeds = [c["seed"] for c in cells]
        hier, flat = bootstrap_mean(values, groups=seeds), bootstrap_mean(values)
        ends = [bootstrap_mean(values, groups=seeds, seed=s).high * POINTS for s in range(10)]
        named = bootstrap_mean([values[i] for i in by_name], groups=[seeds[i] for i in by_name])
        print(f"| {method} | {hier.mean * POINTS:+.2f} [{hier.low * POINTS:+.2f}, "
              f"{hier.high * POINTS:+.2f}] | [{flat.low * POINTS:+.2f}, {flat.high * POINTS:+.2f}] "
              f"| {min(ends):+.3f} to {max(ends):+.3f} | {named.high * POINTS:+.3f} |")


if __name__ == "__main__":
    main()

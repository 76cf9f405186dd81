"""The frontier benchmark's comparison with TopK (benchmarks/frontier.py `table`): the paired
difference averaged over seeds per sequence, and the plots written into a new folder."""

import argparse
import json
import math
from pathlib import Path

from benchmarks import frontier

HOOKPOINT = "layers.12.mlp"
POSITIONS = [100, 50, 150]
"""Next-token positions of the three held-out sequences."""


def write_run(runs: Path, arch: str, delta_by_seq: list[float], fvu: float) -> None:
    """A run folder as `frontier train` / `evaluate` leave it; `delta_by_seq` in nats per
    position of each sequence."""
    d = frontier.run_dir(runs, HOOKPOINT, arch, 16)
    d.mkdir(parents=True)
    (d / "train.json").write_text(json.dumps({"minutes": 0.5}))
    delta_sum = [v * n for v, n in zip(delta_by_seq, POSITIONS)]
    (d / "eval.json").write_text(
        json.dumps(
            {
                "l0": 16.0,
                "fvu": fvu,
                "delta_loss": sum(delta_sum) / sum(POSITIONS),
                "delta_loss_se": 0.001,
                "loss_recovered": 0.6,
                "dead_frac": 0.0,
                "delta_loss_by_sequence": {"positions": POSITIONS, "delta_sum": delta_sum},
            }
        )
    )


def test_table_averages_seeds_per_sequence_and_writes_plots(tmp_path, capsys):
    seed0, seed1 = tmp_path / "seed0", tmp_path / "seed1"
    write_run(seed0, "topk", [0.04, 0.02, 0.03], fvu=0.50)
    write_run(seed0, "jumprelu", [0.05, 0.02, 0.03], fvu=0.51)
    write_run(seed1, "topk", [0.04, 0.03, 0.03], fvu=0.50)
    write_run(seed1, "jumprelu", [0.04, 0.03, 0.04], fvu=0.52)
    plots = tmp_path / "new" / "plots"
    args = argparse.Namespace(
        runs=[seed0, seed1],
        hookpoints=[HOOKPOINT],
        archs=frontier.ARCHS,
        l0s=[16],
        tokens=200_000,
        plots=plots,
    )
    frontier.table(args)

    # Per-sequence differences, averaged over the two seeds: seq 0 +0.005, seq 2 +0.005 nats.
    diff = (0.005 * 100 + 0 * 50 + 0.005 * 150) / 300
    topk = ((0.04 * 100 + 0.02 * 50 + 0.03 * 150) + (0.04 * 100 + 0.03 * 50 + 0.03 * 150)) / 600
    [c] = frontier.versus_topk(frontier.rows(args))
    assert (c["arch"], c["runs"]) == ("jumprelu", 2)
    assert math.isclose(c["diff"], diff) and math.isclose(c["topk_delta"], topk)
    assert math.isclose(c["fvu_diff"], (0.51 / 0.50 + 0.52 / 0.50) / 2 - 1)
    per_seed = [(0.01 * 100) / 300 / (9.5 / 300), (0.01 * 150) / 300 / (10 / 300)]
    assert all(math.isclose(a, b) for a, b in zip(c["per_run"], per_seed))
    out = capsys.readouterr().out
    assert f"{100 * diff / topk:+.1f} ± " in out
    assert (plots / "frontier_layers_12_mlp.png").stat().st_size > 0

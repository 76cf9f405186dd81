"""launch/gpu_check.sh (sae_dist/gpu_check.py): every check runs as real torchrun processes and
its row carries measured numbers; a failing check is reported as FAIL with its error and makes
the exit code 1. On this CPU machine: 2 processes on gloo, ZeRO-3 skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_dist import gpu_check

ROOT = Path(__file__).resolve().parents[2]
# One SAE of the demo's shape (576 x 4608, k = 128, global batch 512) instead of twelve.
ONE_SAE = ["sites.layers=[6]", "sites.sites=[resid]"]


@pytest.mark.slow
@pytest.mark.distributed
def test_gpu_check_script_reports_every_check(tmp_path):
    out = tmp_path / "table.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "gpu_check.sh"),
            "--steps",
            "2",
            "--out",
            str(out),
            *ONE_SAE,
        ],
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["check"]: row for row in json.loads(out.read_text())}
    assert list(rows) == ["allreduce", "ddp", "zero3", "bf16"]
    cuda = torch.cuda.is_available()
    ran = ["allreduce", "ddp", "bf16"] + (["zero3"] if cuda else [])
    for name in ran:
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["processes"] == (torch.cuda.device_count() if cuda else 2)
        assert row["backend"] == ("nccl" if cuda else "gloo")
        assert row["first_s"] > 0 and row["step_s"] > 0 and row["peak_mb"] > 0, row
        # the table printed on stdout shows the row
        assert f"| {name} | ok | {row['processes']} | {row['backend']} |" in result.stdout
    assert "sum checked" in rows["allreduce"]["detail"]
    for name in ("ddp", "bf16"):
        detail = rows[name]["detail"]
        assert "SAEs: 1 x 576x4608 k=128, batch 512 (256/process)" in detail, detail
    assert "mixed precision no" in rows["ddp"]["detail"]
    assert "mixed precision bf16" in rows["bf16"]["detail"]
    if not cuda:
        assert rows["zero3"]["status"] == "skipped: needs CUDA"
        assert rows["zero3"]["first_s"] is None and rows["zero3"]["peak_mb"] is None


@pytest.mark.slow
@pytest.mark.distributed
def test_failing_check_is_reported_with_its_error(tmp_path):
    """A trainer check whose config is refused: FAIL with the worker's error line."""
    args = gpu_check.parse_args(["--steps", "1", "sae.k=5000"])
    row = gpu_check.launch("ddp", 2, args)
    assert row.status.startswith("FAIL: exit code 1: "), row
    assert "sae.k=5000" in row.status, row.status
    assert row.first_s is None


def test_a_check_past_its_timeout_is_reported():
    row = gpu_check.launch("allreduce", 2, gpu_check.parse_args(["--timeout", "2"]))
    assert row.status == "FAIL: no result after 2 s", row


def test_timeout_kills_every_process_of_the_command(tmp_path):
    """A command past its timeout is killed with the processes it started (as torchrun's
    workers), not only itself."""
    marker = "sleep 987.25"  # a command line no other process has
    log = (tmp_path / "log").open("w")
    code = gpu_check.run_with_timeout(
        ["bash", "-c", f"{marker} & {marker}"], dict(os.environ), log, timeout=1
    )
    assert code is None
    left = subprocess.run(["pgrep", "-f", marker], check=False, capture_output=True, text=True)
    assert left.stdout == "", left.stdout


def test_table_and_exit_code(capsys, monkeypatch):
    rows = [
        gpu_check.Row("allreduce", "ok", 2, "gloo", 0.5, 0.25, 300.0, "x"),
        gpu_check.Row("zero3", "skipped: needs CUDA", 2, "-"),
    ]
    table = gpu_check.format_table(rows, "test machine")
    assert table.splitlines()[0].startswith("gpu_check on test machine; torch ")
    assert "| allreduce | ok | 2 | gloo | 0.5000 | 0.2500 | 300 | x |" in table
    assert "| zero3 | skipped: needs CUDA | 2 | - | - | - | - |  |" in table
    # exit code: 1 with a FAIL row, 0 with ok and skipped rows only
    monkeypatch.setattr(gpu_check, "CHECKS", ["allreduce"])
    monkeypatch.setattr(
        gpu_check, "launch", lambda *a: gpu_check.Row("allreduce", "FAIL: x", 2, "-")
    )
    assert gpu_check.main([]) == 1
    monkeypatch.setattr(gpu_check, "launch", lambda *a: rows[0])
    assert gpu_check.main([]) == 0
    assert "| allreduce | ok |" in capsys.readouterr().out

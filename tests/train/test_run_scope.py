"""Runs that share a process share no accelerator state (sae_dist.train.run_scope): accelerate's
precision and device, the process group, the environment accelerate writes and the global RNG
are released when a run ends, normally or by an exception; a Hydra multirun that changes the
precision between points trains each point as a run alone would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState

from sae_dist.checkpoint import load_suite_sae, read_suite_index
from sae_dist.train.run_scope import RunScope

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the scope, unit by unit ---------------------------------------------------------------


def test_a_second_run_chooses_its_own_precision():
    with RunScope(timeout_s=60) as scope:
        first = scope.own(Accelerator(cpu=True, mixed_precision="bf16"))
        assert first.mixed_precision == "bf16"
        # what a run in the same process met before the scope existed
        with pytest.raises(ValueError, match="already been initialized"):
            Accelerator(cpu=True, mixed_precision="no")
    assert not AcceleratorState._shared_state and not PartialState._shared_state
    for precision in ("no", "bf16", "no"):
        with RunScope(timeout_s=60) as scope:
            accelerator = scope.own(Accelerator(cpu=True, mixed_precision=precision))
            assert accelerator.mixed_precision == precision
            assert accelerator.device.type == "cpu"


def test_state_left_by_earlier_code_is_cleared_when_a_run_starts():
    Accelerator(cpu=True, mixed_precision="bf16")  # built outside any run, never released
    with RunScope(timeout_s=60) as scope:
        assert scope.own(Accelerator(cpu=True, mixed_precision="no")).mixed_precision == "no"


def test_a_failed_run_releases_its_state_environment_and_rng(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_DEBUG_MODE", "0")
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="the run failed"), RunScope(timeout_s=60) as scope:
        scope.own(Accelerator(cpu=True, mixed_precision="bf16"))
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as a DeepSpeed plugin sets it
        os.environ["ACCELERATE_DEBUG_MODE"] = "1"
        torch.set_num_threads(threads + 1)  # as accelerate does for several CPU processes
        torch.manual_seed(0)
        torch.rand(10)
        raise RuntimeError("the run failed")
    assert not AcceleratorState._shared_state
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ
    assert os.environ["ACCELERATE_DEBUG_MODE"] == "0"
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.get_num_threads() == threads


def test_the_process_group_a_run_joined_ends_with_it_and_one_it_found_stays():
    def join() -> None:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )

    with RunScope(timeout_s=60):
        join()  # as accelerate or DeepSpeed would, in a launch of one process
    assert not dist.is_initialized()
    join()
    try:
        with RunScope(timeout_s=60):
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


# --- runs in one process -------------------------------------------------------------------

RUN = [
    "model=tiny-qwen3",
    "sites.layers=[1,3]",
    "sites.sites=[resid]",
    "sae.expansion=4",
    "sae.k=8",
    "train.tokens=4096",
    "train.batch_size=256",
    "train.forward_batch_seqs=4",
    "train.buffer_batches=4",
    "train.eval_tokens=0",
    "data.context_size=64",
    "train.lr=0.001",
    "logger=none",
    "model.dtype=float32",
]
"""Two SAEs, 16 steps, no evaluation; the SAE step's precision is swept."""
NAMES = ["layers.1.resid", "layers.3.resid"]


def train_cli(*args: str) -> None:
    """`python -m sae_dist.train <args>` in a fresh process with this process's thread count
    (so that its arithmetic is this process's, bit for bit)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "sae_dist.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


def weights(suite: Path) -> dict[str, dict[str, torch.Tensor]]:
    assert read_suite_index(suite)["evaluated"] is False
    return {name: load_suite_sae(suite, name)[0].state_dict() for name in NAMES}


def assert_equal(a: dict, b: dict) -> None:
    for name, tensors in a.items():
        for key, value in tensors.items():
            torch.testing.assert_close(b[name][key], value, rtol=0, atol=0, msg=f"{name}.{key}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, dict]:
    """Weights of a multirun no -> bf16 -> no in one process (Hydra's default launcher) and of
    a bf16 run alone in its own process."""
    out = tmp_path_factory.mktemp("runs")
    train_cli("-m", *RUN, "trainer.mixed_precision=no,bf16,no", f"out_dir={out / 'sweep'}")
    train_cli(*RUN, "trainer.mixed_precision=bf16", f"out_dir={out / 'bf16_alone'}")
    points = [weights(out / "sweep" / f"job{i}" / "suite") for i in range(3)]
    return {
        "no_first": points[0],
        "bf16": points[1],
        "no_again": points[2],
        "bf16_alone": weights(out / "bf16_alone" / "suite"),
    }


def test_a_multirun_sweeping_precision_trains_each_point_as_a_run_alone(sweep):
    """Every point writes its suite; the bf16 point equals the bf16 run alone and the last
    point the first (itself a run alone), bit for bit; bf16 really changed the step."""
    assert_equal(sweep["no_first"], sweep["no_again"])
    assert_equal(sweep["bf16_alone"], sweep["bf16"])
    assert not torch.equal(sweep["bf16"][NAMES[0]]["W_enc"], sweep["no_first"][NAMES[0]]["W_enc"])


def test_a_deepspeed_run_leaves_nothing_to_the_next_run(tmp_path, monkeypatch, sweep):
    """ZeRO-2 in this process (a one-process launch: DeepSpeed creates the process group and
    sets ACCELERATE_USE_DEEPSPEED), then a single-process bf16 run: the group, the variable
    and DeepSpeed's engine are gone, and the bf16 run equals the bf16 run alone."""
    from sae_dist.train import train
    from tests.conftest import compose_train_config

    launch = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
    }
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    zero2 = tmp_path / "zero2"
    train(
        compose_train_config(
            RUN + ["trainer=zero2", "trainer.mixed_precision=no", f"out_dir={zero2}"]
        )
    )
    assert (zero2 / "suite" / "suite.json").exists()
    assert not dist.is_initialized() and "ACCELERATE_USE_DEEPSPEED" not in os.environ
    train(
        compose_train_config(RUN + ["trainer.mixed_precision=bf16", f"out_dir={tmp_path / 'bf16'}"])
    )
    assert_equal(sweep["bf16_alone"], weights(tmp_path / "bf16" / "suite"))

"""The planner (`python -m sae_dist.plan`): its figures for the paper's scale, its sharding and
buffer rules against the real code, its advice when nothing fits, and its predictions against
measured CPU runs (peak RSS and step time of real trainings: one process, and 2-process DDP,
hookpoint sharding and ZeRO-2 under torchrun on gloo)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sae_dist.config import PlanRunConfig, TrainerKind, register_configs
from sae_dist.errors import ConfigError
from sae_dist.plan import Planner, plan_run
from sae_dist.plan.memory import buffer_cycle
from sae_dist.plan.workload import share
from sae_dist.producer import ShuffleBuffer
from sae_dist.train.loop import training_shape
from tests.conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9


def plan_config(overrides: list[str]) -> PlanRunConfig:
    """PlanRunConfig from conf/plan.yaml plus Hydra overrides."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="plan", overrides=overrides))
    assert isinstance(cfg, PlanRunConfig)
    return cfg


QWEN3_4B_ALL = ["model=qwen3-4b", "sites=all", "sae.expansion=16"]


# --- the paper's scale, from the model config alone ------------------------------------------


def test_qwen3_4b_all_sites_sae_state_and_every_trainer_per_process():
    """108 TopK SAEs of 2560 x 40960: 22.65B parameters, 16 bytes each of fp32 parameters,
    gradients and Adam moments; every trainer gets a per-process figure."""
    report = plan_run(plan_config(QWEN3_4B_ALL))
    saes = report["saes"]
    assert saes["hookpoints"] == 108 and saes["d_sae"] == 40960
    assert saes["params"] == 108 * (2 * 2560 * 40960 + 40960 + 2560)
    assert abs(saes["state_bytes"] / (16 * 22.65e9) - 1) < 0.02
    assert report["model"]["params"] == pytest.approx(4.02e9, rel=0.01)
    assert set(report["trainers"]) == {k.value for k in TrainerKind}
    for name, entry in report["trainers"].items():
        memory = entry["memory_per_process"]
        assert memory["peak_bytes"] == max(memory["phases"].values()), name
        assert memory["peak_bytes"] == pytest.approx(sum(memory["components"].values())), name
    ddp, zero3 = report["trainers"]["ddp"], report["trainers"]["zero3"]
    # DDP holds every SAE with its gradients and Adam moments (on one process: no buckets)
    assert ddp["memory_per_process"]["peak_bytes"] > saes["state_bytes"]
    assert not ddp["fits"] and "trainer=" in ddp["advice"]
    # ZeRO-3 and hookpoint sharding divide the state; one of them is recommended
    assert zero3["fits"] and report["trainers"]["sharded"]["fits"]
    assert report["recommended"]["trainer"] in ("sharded", "zero3")
    assert report["recommended"]["launch"].startswith("accelerate launch --num_processes 8")


def test_cli_prints_one_json_object():
    """The command of the issue's acceptance line, as a script reads it."""
    proc = subprocess.run(
        [sys.executable, "-m", "sae_dist.plan", *QWEN3_4B_ALL, "plan.format=json"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert abs(report["saes"]["state_bytes"] / (16 * 22.65e9) - 1) < 0.02
    assert report["recommended"]["launch"].endswith("trainer=" + report["recommended"]["trainer"])


def test_qwen3_model_configs_build_offline_with_their_published_sizes():
    """conf/model/qwen3-*.yaml carry the hub's architecture: 1.72B, 4.02B and 8.19B parameters
    on the meta device, without the hub."""
    for name, params in (("qwen3-1.7b", 1.72e9), ("qwen3-4b", 4.02e9), ("qwen3-8b", 8.19e9)):
        report = plan_run(plan_config([f"model={name}", "sites=resid", "plan.trainers=[ddp]"]))
        assert report["model"]["params"] == pytest.approx(params, rel=0.005), name


def test_an_unknown_gpu_kind_names_the_known_ones():
    with pytest.raises(ConfigError, match="h100-80gb"):
        Planner(plan_config(["plan.gpu=v100"]))


def test_a_fixed_count_that_does_not_fit_says_how_many_would():
    """Hookpoint sharding of the 4B suite on 2 H100s: it needs 8 (its state is 1/N per
    process); single cannot run on 2 processes at all."""
    report = plan_run(plan_config([*QWEN3_4B_ALL, "plan.gpus=2"]))
    sharded = report["trainers"]["sharded"]
    assert not sharded["fits"] and sharded["advice"].startswith("needs 8 GPUs")
    assert report["trainers"]["single"]["problem"] == "trainer=single runs one process"
    assert report["recommended"] is None


# --- the rules the planner takes from the code -----------------------------------------------


def test_hookpoint_sharding_uses_the_training_loops_assignment():
    """sae_dist.distributed.assign_hookpoints: 108 equal SAEs on 8 processes, at most 14 on
    one; on 5, at most 22. ZeRO and DDP keep every SAE and step 1/N of the batch."""
    planner = Planner(plan_config(QWEN3_4B_ALL))
    w = planner.workload
    assert share(w, TrainerKind.sharded, 8).owned == 14  # type: ignore[union-attr]
    assert share(w, TrainerKind.sharded, 4).stepped_batch == 4096  # type: ignore[union-attr]
    ddp = share(w, TrainerKind.ddp, 4)
    assert not isinstance(ddp, str) and (ddp.owned, ddp.stepped_batch) == (108, 1024)
    assert "divide" in str(share(w, TrainerKind.ddp, 3))  # 3 shards do not divide 16 sequences
    zero2 = planner.plan(TrainerKind.zero2, 8).memory
    ddp8 = planner.plan(TrainerKind.ddp, 8).memory
    assert zero2 is not None and ddp8 is not None
    assert zero2.peak_of("adam_state") == pytest.approx(ddp8.peak_of("adam_state") / 8)
    # DDP's reducer: a bucket copy of every gradient, on more than one process
    assert ddp8.peak_of("comm_buckets") == ddp8.peak_of("sae_params") == w.sae_param_bytes


@pytest.mark.parametrize("capacity, batch, push", [(1024, 256, 200), (32768, 4096, 3891)])
def test_buffer_cycle_matches_the_shuffle_buffers_storage(capacity, batch, push):
    """The storage a real ShuffleBuffer keeps alive (its kept half and ready batches are views
    of the shuffled tensor): with the incoming rows, at most `before` when it shuffles; right
    after shuffling, `after`; each shuffle allocates `shuffling` rows more (cat + permutation)."""
    buffer = ShuffleBuffer(capacity, batch, torch.Generator().manual_seed(0))
    cycle = buffer_cycle(capacity, batch, push)
    before, after, shuffled = [], [], []
    for _ in range(4 * capacity // push + 16):
        incoming = stored_rows(buffer) + push
        buffer.push(torch.zeros(push, 1))
        if buffer.available():  # this push shuffled
            before.append(incoming)
            after.append(stored_rows(buffer))
            shuffled.append(2 * (buffer.available() * batch + buffer.size))
        while buffer.available():
            buffer.pop()
    assert len(before) >= 3
    assert (max(before), max(after), max(shuffled)) == (cycle.before, cycle.after, cycle.shuffling)


def stored_rows(buffer: ShuffleBuffer) -> int:
    """Rows of the distinct storages a buffer's chunks and ready batches hold (one column)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in buffer.chunks + buffer.ready
    }
    return sum(storages.values()) // 4


# --- against measured runs on this CPU -------------------------------------------------------

D128 = ["model=tiny-qwen3", "model.d_model=128", "model.random_config.hidden_size=128",
        "model.random_config.intermediate_size=256", "model.random_config.head_dim=32"]  # fmt: skip
D192 = ["model=tiny-qwen3", "model.d_model=192", "model.random_config.hidden_size=192",
        "model.random_config.intermediate_size=384", "model.random_config.head_dim=48"]  # fmt: skip
COMMON = [
    "train.forward_batch_seqs=8",
    "data.context_size=128",
    "train.buffer_batches=4",
    "train.sequence_pool=64",
    "train.eval_tokens=0",
    "logger=none",
    "model.dtype=float32",
    "trainer.mixed_precision=no",
    "train.resume=false",
]
RUNS = {
    "single": (1, [*D128, "sites.layers=[0,1,2,3]", "sites.sites=[resid]", "sae.expansion=16",
                   "sae.k=32", "train.batch_size=2048", "train.tokens=16384"]),
    "ddp": (2, [*D192, "sites.layers=[1,3]", "sites.sites=[resid,mlp]", "sae.expansion=16",
                "sae.k=16", "train.batch_size=4096", "train.tokens=32768", "trainer=ddp"]),
    "sharded": (2, [*D128, "sites.layers=[0,1,2,3]", "sites.sites=[resid]", "sae.expansion=64",
                    "sae.k=8", "sae.dead_tokens=1", "train.batch_size=2048",
                    "train.tokens=16384", "trainer=sharded", "plan.dead_fraction=0.3"]),
    "zero2": (2, [*D192, "sites.layers=[1,2,3]", "sites.sites=[attn]", "sae.expansion=16",
                  "sae.k=24", "train.batch_size=4096", "train.tokens=32768", "trainer=zero2"]),
}  # fmt: skip
"""Four small suites: one process (4 SAEs 128 x 2048), DDP (4 SAEs 192 x 3072, two sites),
hookpoint sharding with AuxK on every step (4 SAEs 128 x 8192, k 8: a latent is dead when it
did not fire in the last batch, so thousands are: 28-32 % of them measured, planned with
`plan.dead_fraction=0.3`), ZeRO-2 (3 SAEs 192 x 3072 at the attention
output); fp32, 8 steps each (a pool of 64 packed rows: the run starts quickly)."""
MEMORY_BOUND = 0.15
TIME_BOUND = 0.30
SKIPPED_STEPS = 2
"""The first steps (calibration, optimizer state, DeepSpeed's set-up) are not timed."""


def measured_run(tmp_path: Path, name: str) -> list[dict]:
    """Run tests/plan/plan_worker.py for RUNS[name]; one result per process.

    The processes run with glibc's mmap threshold fixed at 64 KiB: every freed tensor goes back
    to the OS, so the peak RSS is the peak of live memory, the quantity the planner predicts
    (under the default dynamic threshold freed pages stay in the heap and the same run's peak
    varied by 70 MB). Step times and the machine's rates are CPU seconds of the process
    (time.process_time), which other jobs on a shared machine do not change."""
    processes, overrides = RUNS[name]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    runner = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]  # fmt: skip
        if processes > 1
        else [sys.executable]
    )
    result = tmp_path / name
    proc = subprocess.run(
        [
            *runner,
            str(ROOT / "tests" / "plan" / "plan_worker.py"),
            str(result),
            *overrides,
            *COMMON,
            f"out_dir={tmp_path / 'run'}",
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard, not a speed limit
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return [json.loads(Path(f"{result}.{rank}.json").read_text()) for rank in range(processes)]


def check(name: str, results: list[dict]) -> None:
    """Every process's predicted peak memory (less its runtime, read by the planner before
    measuring) within MEMORY_BOUND of its peak RSS less its RSS just before training, and the
    predicted `SuiteTrainer.step` (mean over processes) within TIME_BOUND of the median step."""
    for r in results:
        measured = r["peak_rss"] - r["baseline_rss"]
        predicted = r["predicted_peak"] - r["runtime_rss"]
        print(
            f"{name} rank {r['rank']}: memory predicted {predicted / 2**20:.1f} MiB, measured "
            f"{measured / 2**20:.1f} MiB ({predicted / measured:.3f}); step predicted "
            f"{r['predicted_step']:.3f} s, measured "
            f"{statistics.median(r['step_seconds'][SKIPPED_STEPS:]):.3f} s (CPU seconds); "
            f"{r['device']}"
        )
        assert abs(predicted / measured - 1) <= MEMORY_BOUND, (name, r["rank"])
    steps = statistics.mean(statistics.median(r["step_seconds"][SKIPPED_STEPS:]) for r in results)
    predicted_step = statistics.mean(r["predicted_step"] for r in results)
    assert abs(predicted_step / steps - 1) <= TIME_BOUND, (name, predicted_step, steps)


@pytest.mark.slow
def test_single_process_prediction_matches_the_measured_run(tmp_path):
    check("single", measured_run(tmp_path, "single"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ddp", "sharded", "zero2"])
def test_two_process_prediction_matches_the_measured_run(tmp_path, name):
    results = measured_run(tmp_path, name)
    if name == "sharded":  # AuxK ran at full width on the timed steps
        k_aux = 128 // 2
        assert all(min(r["dead_latents"][SKIPPED_STEPS:]) >= k_aux for r in results)
    check(name, results)


def test_the_architecture_dims_do_not_shape_a_checkpoint():
    """`model.architecture` describes the hub's config for the planner and never loads weights:
    a run resumes whether or not its checkpoint recorded it (other model keys still count)."""
    shape = training_shape(plan_config(["model=qwen3-4b"]))
    assert not any(key.startswith("model.architecture") for key in shape)
    assert shape["model.path"] == "Qwen/Qwen3-4B"
    tiny = training_shape(plan_config(["model=tiny-qwen3"]))
    assert tiny["model.random_config.hidden_size"] == 64

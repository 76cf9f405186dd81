"""Multi-process training on CPU (gloo, 2 processes through torchrun): data parallel and
ZeRO-2 match one process with the same global batch and data order, hookpoint sharding matches
the unsharded run, `kill -9` of a process resumes to the same weights on the same or another
process count, and a process that raises ends the run with its error."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sae_dist.checkpoint import load_part, load_suite_sae, read_suite_index
from sae_dist.distributed import Topology, assign_hookpoints
from sae_dist.sae import TopKSAE
from sae_dist.train import train
from tests.conftest import PRECISION, compose_train_config

ROOT = Path(__file__).resolve().parents[2]
HOOKPOINTS = ["layers.1.resid", "layers.3.resid"]
RUN = [
    "model=tiny-qwen3",
    "sites.layers=[1,3]",
    "sites.sites=[resid]",
    "sae.expansion=4",
    "sae.dead_tokens=4096",
    "train.tokens=51200",
    "train.batch_size=256",
    "train.forward_batch_seqs=4",
    "train.buffer_batches=4",
    "train.eval_tokens=500",
    "train.log_every=20",
    "data.context_size=64",
    "train.lr=0.001",
    "logger=none",
    "train.data_shards=2",
    *PRECISION["fp32"],
]
"""Two hookpoints, 200 steps of a global batch of 256 tokens, two data shards, fp32."""
TOPK = ["sae.k=8"]
"""The default architecture's k (other architectures have no `k`)."""


def with_k(overrides: tuple[str, ...] | list[str]) -> list[str]:
    """TOPK unless the overrides choose an architecture (which then set their own keys)."""
    return [] if any(o.startswith("sae=") for o in overrides) else TOPK


GUARD_S = 600
"""Hang guard for a launch (not a speed limit): far above any run here."""


def launch(
    out_dir: Path,
    *overrides: str,
    processes: int = 2,
    fault: str | None = None,
    multirun: bool = False,
) -> subprocess.CompletedProcess:
    """Run tests/train/dist_worker.py under torchrun (or plain python for 1 process);
    `multirun`: a Hydra sweep (`-m`), every point in the same processes, in `out_dir/job<N>`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("SAE_DIST_TEST_FAULT", None)
    if fault:
        env["SAE_DIST_TEST_FAULT"] = fault
    runner = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]
        if processes > 1
        else [sys.executable]
    )
    cmd = [
        *runner,
        str(ROOT / "tests" / "train" / "dist_worker.py"),
        *["-m"] * multirun,
        *RUN,
        *with_k(overrides),
        f"out_dir={out_dir}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=GUARD_S)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def assert_same_saes(a: Path, b: Path, names: list[str] = HOOKPOINTS) -> None:
    """Same weights up to floating-point reduction order: every tensor within 1e-2 relative
    (Frobenius) and, where evaluated, the same held-out FVU within 2e-3. Measured: runs agree to
    ~1e-7 until a rounding difference flips one TopK choice; after 200 steps one SAE of two was
    ~4e-4 away (FVU 0.44498 vs 0.44505). Errors such as a doubled LR schedule or unaveraged
    gradients move the weights by 5e-2 to 2 (relative)."""
    for name in names:
        sae_a, cfg_a = load_suite_sae(a / "suite", name)
        sae_b, cfg_b = load_suite_sae(b / "suite", name)
        assert cfg_a["metadata"]["training_tokens"] == cfg_b["metadata"]["training_tokens"]
        for key, value in sae_a.state_dict().items():
            rel = float((sae_b.state_dict()[key] - value).norm() / value.norm())
            assert rel < 1e-2, f"{name}.{key} differs by {rel:.2e} (relative)"
        assert ("fvu" in cfg_a["metadata"]) == ("fvu" in cfg_b["metadata"])  # both evaluated
        if "fvu" in cfg_a["metadata"]:
            assert abs(cfg_a["metadata"]["fvu"] - cfg_b["metadata"]["fvu"]) < 2e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The single-process run with data_shards=2 (same global batches and data order)."""
    out = tmp_path_factory.mktemp("single")
    train(compose_train_config(RUN + TOPK + [f"out_dir={out}"]))
    return out


# --- fast units ----------------------------------------------------------------------------


def test_hookpoint_assignment_balances_sizes():
    sizes = {"a": 10, "b": 7, "c": 5, "d": 4, "e": 3, "f": 1}
    owners = assign_hookpoints(sizes, 2)
    load = [sum(s for n, s in sizes.items() if owners[n] == r) for r in range(2)]
    assert sorted(load) == [15, 15]
    assert assign_hookpoints(dict.fromkeys("abcd", 1), 2) == {"a": 0, "b": 1, "c": 0, "d": 1}
    assert set(assign_hookpoints({"x": 1}, 3).values()) == {0}


def test_topology_hosts_shards_round_robin_and_rejects_bad_counts():
    assert Topology(1, 2, 4).shards == [1, 3]
    assert Topology(0, 1, 4).shards == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="data_shards=3 must be a multiple"):
        Topology(0, 2, 3)


# --- two processes -------------------------------------------------------------------------


@pytest.mark.distributed
def test_ddp_matches_one_process_with_the_same_global_batch(tmp_path, reference):
    ok(launch(tmp_path, "trainer=ddp"))
    assert_same_saes(reference, tmp_path)
    index = read_suite_index(tmp_path / "suite")
    assert (index["trainer"], index["processes"], index["data_shards"]) == ("ddp", 2, 2)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "arch, kind",
    [("batchtopk", "ddp"), ("jumprelu", "ddp"), ("relu", "ddp"), ("jumprelu", "zero2")],
)
def test_global_batch_statistics_of_every_architecture_match_one_process(tmp_path, arch, kind):
    """BatchTopK's batch-level selection and threshold, JumpReLU's L0, thresholds, TopK warm-up
    and L0 controller, the L1 penalty's normaliser: over the global batch. 16 steps, before any
    TopK flip can diverge. Under ZeRO the thresholds that JumpReLU sets after each step must
    reach the optimizer's fp32 master copies, or the next step overwrites them."""
    extra = {"batchtopk": TOPK, "jumprelu": ["sae.target_l0=8"], "relu": []}[arch]
    short = [f"sae={arch}", *extra, "train.tokens=4096"]
    single = tmp_path / "single"
    train(compose_train_config(RUN + short + [f"out_dir={single}"]))
    ok(launch(tmp_path / "ddp", *short, f"trainer={kind}"))
    for name in HOOKPOINTS:
        a, _ = load_suite_sae(single / "suite", name)
        b, _ = load_suite_sae(tmp_path / "ddp" / "suite", name)
        for key, value in a.state_dict().items():
            rel = float((b.state_dict()[key] - value).norm() / value.norm().clamp_min(1e-12))
            assert rel < 1e-5, f"{arch} {name}.{key} differs by {rel:.2e}"


@pytest.mark.distributed
def test_a_multirun_of_ddp_in_fp32_then_bf16_in_the_same_processes_matches_one_process(tmp_path):
    """Hydra runs the sweep points in the same two processes: each point joins a process group
    of its own and starts without the previous point's accelerate state, and DDP under bf16
    autocast matches one process under bf16 as DDP in fp32 matches one process in fp32 (16
    steps). Measured: DDP vs one process differs by <= 2e-7 (fp32) and <= 3e-5 (bf16)
    relative; bf16 vs fp32 by 1e-3 to 8e-3, so the bf16 bound also shows bf16 was on."""
    short = ["train.tokens=4096", "train.eval_tokens=0"]
    ok(
        launch(
            tmp_path / "sweep",
            "trainer=ddp",
            *short,
            "trainer.mixed_precision=no,bf16",
            multirun=True,
        )
    )
    for job, (precision, bound) in enumerate([("no", 1e-5), ("bf16", 3e-4)]):
        single = tmp_path / precision
        train(
            compose_train_config(
                RUN + TOPK + short + [f"trainer.mixed_precision={precision}", f"out_dir={single}"]
            )
        )
        ddp = tmp_path / "sweep" / f"job{job}"
        assert read_suite_index(ddp / "suite")["trainer"] == "ddp"
        for name in HOOKPOINTS:
            a, _ = load_suite_sae(single / "suite", name)
            b, _ = load_suite_sae(ddp / "suite", name)
            for key, value in a.state_dict().items():
                rel = float((b.state_dict()[key] - value).norm() / value.norm())
                assert rel < bound, f"{precision} {name}.{key} differs by {rel:.2e}"


@pytest.mark.distributed
def test_zero2_shards_optimizer_state_and_reloads_as_a_plain_sae(tmp_path, reference):
    ok(launch(tmp_path, "trainer=zero2", "train.checkpoint_every=40"))
    deepspeed_files = [p.name for p in (tmp_path / "checkpoint" / "deepspeed").rglob("*.pt")]
    assert sum("optim_states" in n for n in deepspeed_files) == 2  # one partition per process
    sae, _ = load_suite_sae(tmp_path / "suite", HOOKPOINTS[0])
    assert type(sae) is TopKSAE and not any(p.requires_grad is False for p in sae.parameters())
    assert_same_saes(reference, tmp_path)


@pytest.mark.distributed
def test_hookpoint_sharding_splits_the_saes_and_matches_the_unsharded_run(tmp_path, reference):
    proc = ok(
        launch(
            tmp_path, "sites.sites=[resid,mlp]", "trainer=sharded", "train.checkpoint_every=1000"
        )
    )
    logs = proc.stdout + proc.stderr
    assert "process 0/2 trains 2 of 4 SAEs" in logs and "process 1/2 trains 2 of 4 SAEs" in logs
    unsharded = tmp_path / "unsharded"
    train(compose_train_config(RUN + TOPK + ["sites.sites=[resid,mlp]", f"out_dir={unsharded}"]))
    assert_same_saes(unsharded, tmp_path, HOOKPOINTS + ["layers.1.mlp", "layers.3.mlp"])


@pytest.mark.distributed
def test_kill_9_of_one_process_resumes_to_the_same_weights_on_2_or_1_processes(tmp_path, reference):
    killed_dir = tmp_path / "killed"
    killed = launch(killed_dir, "trainer=ddp", "train.checkpoint_every=10", fault="1:57:kill")
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert not (killed_dir / "suite").exists()
    run_state = load_part(killed_dir / "checkpoint", "run.pt")
    assert run_state["forward_batches"] == 50 and run_state["data_shards"] == 2
    for processes in (2, 1):
        out = tmp_path / f"resumed_on_{processes}"
        shutil.copytree(killed_dir, out)
        resumed = ok(launch(out, "trainer=ddp", "train.checkpoint_every=10", processes=processes))
        assert "resumed from" in resumed.stdout + resumed.stderr
        assert_same_saes(reference, out)


@pytest.mark.distributed
def test_a_stop_signal_to_one_process_stops_both_at_the_same_step(tmp_path, reference):
    """SIGUSR1 reaches process 1 only, in its 30th forward batch: both processes finish that
    step, save it and exit with 75 (they agree at the step boundary, or the other would wait in
    its next collective); the restart matches the single-process run."""
    stopped = launch(tmp_path, "trainer=ddp", fault="1:30:usr1")
    logs = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0
    assert "exitcode  : 75" in logs, logs[-3000:]
    steps = re.findall(
        r"stopping on (SIGUSR1|another process's signal): checkpoint saved at "
        r"step (\d+) of 200",
        logs,
    )
    assert sorted(who for who, _ in steps) == ["SIGUSR1", "another process's signal"], logs[-3000:]
    assert steps[0][1] == steps[1][1]
    assert load_part(tmp_path / "checkpoint", "run.pt")["forward_batches"] == 30
    assert not (tmp_path / "suite").exists()
    resumed = ok(launch(tmp_path, "trainer=ddp"))
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_saes(reference, tmp_path)


@pytest.mark.distributed
def test_a_process_that_raises_ends_every_process_with_its_error(tmp_path):
    # bounded: the launcher stops the other process, or at worst its collective times out
    # (trainer.timeout_s); `launch` would raise TimeoutExpired on a hang
    proc = launch(tmp_path, "trainer=ddp", "trainer.timeout_s=60", fault="1:5:raise")
    assert proc.returncode != 0
    assert "injected failure on rank 1 at forward batch 5" in proc.stdout + proc.stderr

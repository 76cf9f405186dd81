"""docker/Dockerfile on a real Docker daemon (the scripts of ../shared/cluster/docker): it builds
on a local base image, keeps the base's torch, refuses a base without torch, and the image runs
`sae-train --help` and a tiny training run without network as a non-root user.

No registry is reachable, so the base is made here: a Debian image (`base-image.sh`), plus the
CPU torch wheel this venv runs, installed by `docker run` + `docker commit` (no wheel is left in
a layer), standing in for the default CUDA PyTorch base. The daemon is started only if none
answers, and then stopped at the end; images stay in /var/lib/docker for the next run.
Skipped (reason printed) only where the machine cannot run them: not root, no
../shared/cluster, no package mirror for docker.io / debootstrap."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT.parent / "shared" / "cluster" / "docker"
IMAGE = "sae_dist:test"
TORCH_BASE = "sae_dist-test-torch"
"""Repository of the stand-in base (tag: the torch version)."""
WHEEL_LABEL = "sae_dist.torch_wheel_sha256"
ADDED_BYTES_MAX = 1.25e9
"""What docker/Dockerfile may add to its base: measured 0.97 GB (dependencies 965 MB, of which
the offline model and data 214 MB)."""

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    """A command with its output captured; on failure the assertion shows the output's tail."""
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, (
            f"{' '.join(command)} -> {result.returncode}\n{(result.stdout + result.stderr)[-4000:]}"
        )
    return result


def why_not_runnable() -> str | None:
    """Why this machine cannot run the Docker tests, or None."""
    if os.geteuid() != 0:
        return "the local Docker daemon (../shared/cluster/docker) needs root"
    if not CLUSTER.is_dir():
        return f"{CLUSTER} not found"
    for tool, package in (("dockerd", "docker.io"), ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None and not apt_has(package):
            return f"no package mirror: {tool} is not installed and apt has no {package}"
    return None


def apt_has(package: str) -> bool:
    if shutil.which("apt-cache") is None:
        return False
    policy = run("apt-cache", "policy", package, check=False).stdout
    return "Candidate:" in policy and "Candidate: (none)" not in policy


@pytest.fixture(scope="session")
def docker_daemon():
    """A running dockerd: started by ../shared/cluster/docker/start.sh if none answers, and
    then stopped at the end of the session."""
    reason = why_not_runnable()
    if reason:
        pytest.skip(reason)
    running = bool(shutil.which("docker")) and run("docker", "info", check=False).returncode == 0
    if not running:
        run(str(CLUSTER / "start.sh"))
    yield
    if not running:
        run(str(CLUSTER / "stop.sh"))


@pytest.fixture(scope="session")
def base_image(docker_daemon) -> str:
    """The Debian base without torch (`sae-base:bookworm`; built once, ~2.5 min)."""
    return run(str(CLUSTER / "base-image.sh")).stdout.split()[-1]


@pytest.fixture(scope="session")
def torch_base(base_image, tmp_path_factory) -> str:
    """`base_image` plus this venv's torch (the CPU wheel pip finds for its version and the
    image's Python), committed from a container that installs it from a read-only mount.
    Reused while the wheel is the same (label)."""
    python = run(
        "docker",
        "run",
        "--rm",
        base_image,
        "python",
        "-c",
        "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')",
    ).stdout
    wheels = tmp_path_factory.mktemp("torch-wheel")
    run(
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python.strip(),
        "-d",
        str(wheels),
        f"torch=={torch.__version__}",
    )
    [wheel] = wheels.glob("torch-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    tag = f"{TORCH_BASE}:{torch.__version__.replace('+', '-')}"
    label = f'{{{{index .Config.Labels "{WHEEL_LABEL}"}}}}'
    inspect = run("docker", "image", "inspect", "-f", label, tag, check=False)
    if inspect.returncode == 0 and inspect.stdout.strip() == digest:
        return tag
    container = f"sae_dist-test-torch-{os.getpid()}"
    try:
        run(
            "docker",
            "run",
            "--name",
            container,
            "-v",
            f"{wheels}:/wheels:ro",
            base_image,
            "pip",
            "install",
            "--no-cache-dir",
            f"/wheels/{wheel.name}",
        )
        run(
            "docker",
            "commit",
            "--change",
            'CMD ["/bin/bash"]',
            "--change",
            f"LABEL {WHEEL_LABEL}={digest}",
            container,
            tag,
        )
    finally:
        run("docker", "rm", "-f", container, check=False)
    return tag


@pytest.fixture(scope="session")
def image(torch_base) -> str:
    """The issue's build line: docker/Dockerfile FROM the torch base, from the repository."""
    run(
        "docker",
        "build",
        "--force-rm",
        "--build-arg",
        f"BASE_IMAGE={torch_base}",
        "-f",
        "docker/Dockerfile",
        "-t",
        IMAGE,
        str(ROOT),
    )
    return IMAGE


def in_image(image: str, *command: str, mount: Path | None = None) -> str:
    """stdout of `command` in a fresh container of `image` without network (removed after)."""
    volume = ["-v", f"{mount}:{mount}"] if mount else []
    return run("docker", "run", "--rm", "--network", "none", *volume, image, *command).stdout


def image_bytes(image: str) -> int:
    return int(run("docker", "image", "inspect", "-f", "{{.Size}}", image).stdout)


def test_a_base_without_torch_is_refused(base_image):
    result = run(
        "docker",
        "build",
        "--force-rm",
        "--build-arg",
        f"BASE_IMAGE={base_image}",
        "-f",
        "docker/Dockerfile",
        str(ROOT),
        check=False,
    )
    assert result.returncode != 0
    assert "error: BASE_IMAGE has no torch" in result.stdout + result.stderr


def test_image_keeps_the_base_torch_and_installs_the_wheel(image, torch_base):
    probe = (
        "import json, os, torch, sae_dist, sae_dist.cli; print(json.dumps({'torch': "
        "torch.__version__, 'uid': os.getuid(), 'package': sae_dist.__file__, "
        "'conf': str(sae_dist.cli.CONF_DIR), 'cwd': os.getcwd()}))"
    )
    base_torch = in_image(torch_base, "python", "-c", "import torch; print(torch.__version__)")
    found = json.loads(in_image(image, "python", "-c", probe))
    assert found["torch"] == base_torch.strip() == torch.__version__
    assert found["uid"] == 1000
    # the wheel in site-packages with its configs; no source tree in the image
    site = "/opt/venv/lib/python3.11/site-packages/sae_dist"
    assert (found["package"], found["conf"]) == (f"{site}/__init__.py", f"{site}/conf")
    assert found["cwd"] == "/opt/sae_dist"
    listing = in_image(image, "ls", "/opt/sae_dist", "/opt/sae_dist/launch").split()
    assert sorted(listing) == sorted(
        ["/opt/sae_dist:", "launch", "runs", "/opt/sae_dist/launch:", "accelerate", "deepspeed"]
    )
    added = image_bytes(image) - image_bytes(torch_base)
    assert 0 < added < ADDED_BYTES_MAX, f"docker/Dockerfile adds {added / 1e9:.2f} GB"


def test_image_runs_sae_train_offline(image, tmp_path):
    from sae_dist.checkpoint import load_suite_sae

    help_text = in_image(image, "sae-train", "--help")
    assert "tiny-qwen3" in help_text and "train.tokens: int = " in help_text
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o777)  # the image's user (uid 1000) writes there
    in_image(
        image,
        "sae-train",
        "model=tiny-qwen3",
        "sites=resid",
        "logger=none",
        "train.tokens=4096",
        "train.eval_tokens=0",
        f"out_dir={out}",
        mount=out,
    )
    suite = json.loads((out / "suite" / "suite.json").read_text())
    hookpoints = [f"layers.{i}.resid" for i in range(4)]
    assert [e["hookpoint"] for e in suite["saes"]] == hookpoints
    assert suite["training_tokens"] == 4096 and suite["evaluated"] is False
    for name in hookpoints:
        sae, cfg = load_suite_sae(out / "suite", name)
        assert sae.d_in == 64 and cfg["metadata"]["training_tokens"] == 4096
        assert all(torch.isfinite(p).all() for p in sae.parameters())
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["sae_tokens_trained"] == 4096 and stats["lm_train_tokens_per_s"] > 0


def test_image_runs_the_first_hour_check(image):
    """`python -m sae_dist.gpu_check` in the image without network (one SAE of the demo's shape):
    2 gloo processes on this CPU machine, every check passes or is skipped."""
    table = in_image(
        image,
        "python",
        "-m",
        "sae_dist.gpu_check",
        "--steps",
        "1",
        "sites.layers=[6]",
        "sites.sites=[resid]",
    )
    for check in ("allreduce", "ddp", "bf16"):
        assert f"| {check} | ok | 2 | gloo |" in table, table
    assert "| zero3 | skipped: needs CUDA |" in table

"""The SAELens release export: sparsity.safetensors written with saved SAEs (from the end-of-run
held-out evaluation) and by the export (a held-out pass for SAEs without it), the hub folder and
its pretrained_saes.yaml entry; the real `sae-lens` loads every exported SAE, reads its sparsity
through its hub loader (an offline Hugging Face cache holding the folder) and parses the entry
with its own pretrained_saes.yaml loader; refused output folders."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from sae_dist.checkpoint import load_sae, load_sparsity, save_sae, write_suite_index
from sae_dist.config import ConfigError, register_configs
from sae_dist.data import TokenStream
from sae_dist.evaluate import evaluate_saes
from sae_dist.export import run_export
from sae_dist.hookpoints import Hookpoint
from sae_dist.models import load_model
from sae_dist.suite import load_suite
from sae_dist.train import train
from sae_dist.train.results import heldout_density
from tests.conftest import CONF_DIR
from tests.evaluate.test_evaluate import topk_sae
from tests.train.test_train import tiny_run

HPS = [Hookpoint(1, "resid"), Hookpoint(2, "mlp"), Hookpoint(3, "attn")]
SAVED = {"layers.1.resid", "layers.2.mlp"}
"""SAEs of the test suite saved with sparsity.safetensors and held-out metrics; layers.3.attn
has neither, so the export measures it."""


def compose_export(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name="export", overrides=overrides))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite")
    entries = []
    gen = torch.Generator().manual_seed(0)
    for i, hp in enumerate(HPS):
        meta = {"hookpoint": hp.name, "model_name": "tiny-qwen3", "hook_name": hp.saelens_hook_name}
        density = None
        if hp.name in SAVED:
            meta |= {
                "l0": 7.5 + i,
                "fvu": 0.25,
                "sparsity_source": "heldout_eval",
                "eval_tokens": 99,
            }
            density = torch.rand(256, generator=gen, dtype=torch.float64) ** 3
            density[:5] = 0
        save_sae(topk_sae(i), path / hp.name, meta, density)
        entries.append({"hookpoint": hp.name, "path": hp.name})
    write_suite_index(path, entries, {"model": "tiny-qwen3", "architecture": "topk"})
    return path


def test_sparsity_file_round_trip_and_end_of_run_density(tmp_path):
    density = torch.tensor([0.0, 1e-12, 0.5, 1.0], dtype=torch.float64)
    save_sae(topk_sae(0, d_in=64), tmp_path / "sae", {"hookpoint": "layers.0.resid"}, density)
    got = load_sparsity(tmp_path / "sae")
    assert got is not None and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.log10(density + 1e-10).float())
    assert got[0] == -10 and load_sparsity(tmp_path) is None
    with pytest.raises(ValueError, match="fractions"):
        save_sae(topk_sae(0), tmp_path / "bad", {}, torch.tensor([0.5, 1.5]))
    result = {"tokens": 8, "latent_fire_counts": [0, 2, 8]}
    assert heldout_density(result).tolist() == [0.0, 0.25, 1.0]
    assert heldout_density({}) is None and heldout_density(None) is None


def test_training_saves_the_held_out_densities(tmp_path):
    """Each saved SAE's sparsity.safetensors is log10(fires / tokens + 1e-10) of the end-of-run
    evaluation (its per-SAE JSON); an unevaluated run saves none."""
    train(tiny_run(tmp_path / "run", "logger=none", "sites.layers=[1]", "sites.sites=[resid]"))
    doc = json.loads((tmp_path / "run" / "eval" / "saes" / "layers.1.resid.json").read_text())
    density = torch.tensor(doc["latent_fire_counts"], dtype=torch.float64) / doc["tokens"]
    assert density.sum() > 0 and len(density) == 256
    folder = tmp_path / "run" / "suite" / "layers.1.resid"
    assert torch.equal(load_sparsity(folder), torch.log10(density + 1e-10).float())
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["sparsity_source"] == "heldout_eval" and meta["eval_tokens"] == doc["tokens"]
    train(tiny_run(tmp_path / "bare", "logger=none", "sites.layers=[1]", "train.eval_tokens=0"))
    assert load_sparsity(tmp_path / "bare" / "suite" / "layers.1.resid") is None


SAE_LENS_CHECK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE
    from sae_lens.loading import pretrained_saes_directory as directory

    release_dir, hub_cache, release = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    # sae-lens's own loader of pretrained_saes.yaml, pointed at the exported entry
    directory.files = lambda package: release_dir
    directory.get_pretrained_saes_directory.cache_clear()
    lookup = directory.get_pretrained_saes_directory()[release]
    x = load_file(str(release_dir.parent / "x.safetensors"))["x"]
    out, info = {}, {"repo_id": lookup.repo_id, "model": lookup.model, "saes": lookup.saes_map,
                     "l0": lookup.expected_l0, "variance_explained": lookup.expected_var_explained,
                     "neuronpedia": lookup.neuronpedia_id}
    for sae_id, path in lookup.saes_map.items():
        local = SAE.load_from_disk(str(release_dir / path))
        # the hub path: hf_hub_download from the offline cache, sparsity included
        hub, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id)
        with torch.no_grad():
            out[sae_id + ".x_hat"] = local(x)
            out[sae_id + ".hub_x_hat"] = hub(x)
            out[sae_id + ".z"] = local.encode(x)
        out[sae_id + ".sparsity"] = sparsity
        info[sae_id + ".neuronpedia_id"] = cfg.get("neuronpedia_id")
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(release_dir.parent / "out.safetensors"))
    (release_dir.parent / "info.json").write_text(json.dumps(info))
""")


def offline_hub_cache(cache, repo_id: str, folder) -> None:
    """A Hugging Face hub cache holding `folder` as the main revision of model repo `repo_id`
    (what `hf_hub_download` reads with HF_HUB_OFFLINE=1 after a download)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_release_loads_in_sae_lens(suite, tmp_path):
    out = tmp_path / "release"
    cfg = compose_export(
        [
            f"suite={suite}",
            "format=saelens",
            f"out_dir={out}",
            "release=tiny-sae-dist",
            "repo_id=someone/tiny-saes",
            "neuronpedia.model_id=tiny-qwen3",
            "tokens=150",
            "batch_seqs=2",
            "data.context_size=40",
        ]
    )
    run_export(cfg)
    entry = yaml.safe_load((out / "pretrained_saes.yaml").read_text())
    assert list(entry) == ["tiny-sae-dist"]
    release = entry["tiny-sae-dist"]
    assert release["repo_id"] == "someone/tiny-saes" and release["model"] == "tiny-qwen3"
    assert [s["id"] for s in release["saes"]] == [hp.name for hp in HPS]
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: saelens\n")
    # the SAEs saved with sparsity and metrics are copied: weights byte for byte, same sparsity
    for hp in HPS:
        assert (out / hp.name / "sae_weights.safetensors").read_bytes() == (
            suite / hp.name / "sae_weights.safetensors"
        ).read_bytes()
    for s in release["saes"][:2]:
        assert torch.equal(load_sparsity(out / s["path"]), load_sparsity(suite / s["path"]))
        meta = json.loads((out / s["path"] / "cfg.json").read_text())["metadata"]
        assert meta["sparsity_source"] == "heldout_eval" and meta["sparsity_tokens"] == 99
        assert s["variance_explained"] == 0.75
    assert [s["l0"] for s in release["saes"][:2]] == [7.5, 8.5]
    assert release["saes"][0]["neuronpedia"] == "tiny-qwen3/1-res-tiny-sae-dist"
    assert release["saes"][2]["neuronpedia"] == "tiny-qwen3/3-att-tiny-sae-dist"
    # the third is measured by the evaluator over the same held-out batches
    loaded = load_suite(suite, "cpu")
    model, tokenizer = load_model(loaded.model, torch.device("cpu"))
    batches = list(
        TokenStream(loaded.held_out_data(cfg.data), tokenizer, "eval").batches_until(150, 2)
    )
    hp = HPS[2]
    ref = evaluate_saes(
        model,
        {hp: loaded.saes[hp]},
        batches,
        torch.device("cpu"),
        outlier_factor=10.0,
        model_level=False,
    )[hp.name]
    density = torch.tensor(ref["latent_fire_counts"], dtype=torch.float64) / ref["tokens"]
    assert torch.equal(load_sparsity(out / hp.name), torch.log10(density + 1e-10).float())
    meta = json.loads((out / hp.name / "cfg.json").read_text())["metadata"]
    assert meta["sparsity_source"] == "export_heldout" and meta["sparsity_tokens"] == ref["tokens"]
    assert release["saes"][2]["l0"] == round(ref["l0"], 4)
    assert release["saes"][2]["variance_explained"] == round(1 - ref["fvu"], 4)

    # the real sae-lens: every SAE from disk and from the (offline) hub, and the yaml entry
    x = torch.randn(50, 64)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    offline_hub_cache(tmp_path / "hub", "someone/tiny-saes", out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    python = os.environ.get("SAE_LENS_PYTHON", sys.executable)
    result = subprocess.run(
        [python, "-c", SAE_LENS_CHECK, str(out), str(tmp_path / "hub"), "tiny-sae-dist"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, f"sae-lens in {python} failed:\n{result.stderr[-4000:]}"
    got = load_file(str(tmp_path / "out.safetensors"))
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["repo_id"] == "someone/tiny-saes" and info["model"] == "tiny-qwen3"
    assert info["saes"] == {hp.name: hp.name for hp in HPS}
    assert info["l0"]["layers.1.resid"] == 7.5
    assert info["variance_explained"]["layers.2.mlp"] == 0.75
    for hp in HPS:
        sae, _ = load_sae(out / hp.name)
        with torch.no_grad():
            latents = sae.encode(x)
            x_hat = sae.decode(latents)
        torch.testing.assert_close(got[f"{hp.name}.z"], latents.dense(), rtol=0, atol=1e-6)
        torch.testing.assert_close(got[f"{hp.name}.x_hat"], x_hat, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[f"{hp.name}.hub_x_hat"], x_hat, rtol=0, atol=1e-5)
        assert torch.equal(got[f"{hp.name}.sparsity"], load_sparsity(out / hp.name))
        assert info[f"{hp.name}.neuronpedia_id"] == info["neuronpedia"][hp.name]
    assert info["neuronpedia"]["layers.2.mlp"] == "tiny-qwen3/2-mlp-tiny-sae-dist"


def test_output_folders_that_are_refused_or_replaced(suite, tmp_path):
    base = [
        f"suite={suite}",
        "format=saelens",
        "release=r",
        "repo_id=a/b",
        "tokens=40",
        "batch_seqs=2",
        "data.context_size=40",
    ]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="out_dir="):
        run_export(compose_export([*base, f"out_dir={tmp_path / 'busy'}"]))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="neither inside nor around the suite"):
        run_export(compose_export([*base, f"out_dir={suite.parent}"]))
    with pytest.raises(ConfigError, match="repo_id"):
        compose_export([f"suite={suite}", "release=r", f"out_dir={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match="release"):
        compose_export([*base[:2], "release=no spaces", "repo_id=a/b", f"out_dir={tmp_path}"])
    out = tmp_path / "again"
    run_export(compose_export([*base, f"out_dir={out}"]))
    (out / "stale").write_text("from the first export")
    run_export(compose_export([*base, f"out_dir={out}"]))  # an earlier export is replaced
    assert not (out / "stale").exists() and (out / "pretrained_saes.yaml").is_file()


def test_command_line_errors_are_one_line(suite, tmp_path):
    """`python -m sae_dist.export` with a bad format: one line on stderr, exit code 2."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_dist.export",
            f"suite={suite}",
            "format=hub",
            f"out_dir={tmp_path / 'x'}",
            "release=r",
            "repo_id=a/b",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config error: format='hub' is not allowed; allowed: saelens, neuronpedia"
    )
    assert not (tmp_path / "x").exists()

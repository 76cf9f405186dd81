"""A suite as a SAELens release (DESIGN.md section 6b): the folder to upload to a Hugging Face
repository and the release's entry for SAELens's `pretrained_saes.yaml`.

    <out_dir>/pretrained_saes.yaml           {release: {repo_id, model, conversion_func, links,
                                              saes: [{id, path, l0, variance_explained
                                              [, neuronpedia]}]}}
    <out_dir>/README.md                      the repository's model card
    <out_dir>/<hookpoint>/cfg.json           as saved, metadata + sparsity_source/_tokens
    <out_dir>/<hookpoint>/sae_weights.safetensors   byte for byte as saved
    <out_dir>/<hookpoint>/sparsity.safetensors      log10 firing density per latent

SAE id and path are the hookpoint name. Densities come from the suite's own
sparsity.safetensors (written by training from its end-of-run held-out evaluation,
`sparsity_source` "heldout_eval"), else from a held-out pass made here with the evaluator
(`sparsity_source` "export_heldout", over `tokens` tokens), which also supplies L0 and variance
explained for SAEs saved without them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from sae_dist.checkpoint import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, save_sparsity
from sae_dist.config import ExportConfig
from sae_dist.data import TokenStream
from sae_dist.evaluate import evaluate_saes
from sae_dist.hookpoints import Hookpoint
from sae_dist.models import load_model
from sae_dist.suite import LoadedSuite

YAML_FILE = "pretrained_saes.yaml"


def neuronpedia_id(model_id: str, set_suffix: str, hookpoint: Hookpoint) -> str:
    """`<model id>/<layer>-<site set>-<suffix>`: the id of an SAE's Neuronpedia source
    (`sae_dist.export.neuronpedia` writes the same)."""
    return f"{model_id}/{hookpoint.layer}-{site_set(hookpoint, set_suffix)}"


def site_set(hookpoint: Hookpoint, suffix: str) -> str:
    """Neuronpedia's source-set name of a site: res-, mlp- or att-<suffix>."""
    return {"resid": "res", "mlp": "mlp", "attn": "att"}[hookpoint.site] + "-" + suffix


def heldout_pass(cfg: ExportConfig, suite: LoadedSuite, names: list[str]) -> dict[str, Any]:
    """The evaluator's reconstruction metrics and latent fire counts (no model-level pass) of
    the SAEs `names` over `cfg.tokens` held-out tokens."""
    model, tokenizer = load_model(suite.model, suite.device)
    stream = TokenStream(suite.held_out_data(cfg.data), tokenizer, "eval")
    batches = list(stream.batches_until(cfg.tokens, cfg.batch_seqs))
    saes = {hp: sae for hp, sae in suite.saes.items() if hp.name in names}
    return evaluate_saes(
        model,
        saes,
        batches,
        suite.device,
        outlier_factor=cfg.data.policy.outlier_factor,
        model_level=False,
    )


def sae_entry(
    hp: Hookpoint, metadata: dict[str, Any], measured: dict[str, Any] | None, np_id: str | None
) -> dict[str, Any]:
    """The SAE's line of the release's `saes` list: l0 and variance explained from its saved
    held-out metrics, else from this export's held-out pass."""
    source = measured if measured is not None else metadata
    entry: dict[str, Any] = {
        "id": hp.name,
        "path": hp.name,
        "l0": round(float(source["l0"]), 4),
        "variance_explained": round(1 - float(source["fvu"]), 4),
    }
    if np_id is not None:
        entry["neuronpedia"] = np_id
    return entry


def release_entry(
    cfg: ExportConfig, suite: LoadedSuite, saes: list[dict[str, Any]]
) -> dict[str, Any]:
    """{release: {...}}, the release's `pretrained_saes.yaml` entry."""
    model = suite.model.path or suite.model.name
    entry: dict[str, Any] = {
        "repo_id": cfg.repo_id,
        "model": model,
        "conversion_func": None,
        "links": {"model": f"https://huggingface.co/{model}"} if suite.model.path else {},
        "saes": saes,
    }
    return {cfg.release: entry}


def model_card(cfg: ExportConfig, suite: LoadedSuite, entry: dict[str, Any]) -> str:
    """README.md of the hub repository: what the SAEs are and how SAELens loads them."""
    rows = "\n".join(
        f"| `{s['id']}` | {s['l0']} | {s['variance_explained']} |"
        for s in entry[cfg.release]["saes"]
    )
    first = entry[cfg.release]["saes"][0]["id"]
    return (
        f"---\nlibrary_name: saelens\ntags:\n- sparse-autoencoder\n- sae_dist\n---\n\n"
        f"# {cfg.release}\n\nSparse autoencoders on `{entry[cfg.release]['model']}`, trained with "
        f"sae_dist (SAELens v6 layout; every SAE takes the model's raw activations).\n\n"
        f"| SAE id | L0 | variance explained |\n|---|---:|---:|\n{rows}\n\n"
        f"L0 and variance explained are held-out figures; `sparsity.safetensors` holds each "
        f"latent's log10 firing density on held-out tokens.\n\n```python\nfrom sae_lens import "
        f"SAE\n\nsae = SAE.load_from_disk('{first}')  # a downloaded folder\n# with the entry of "
        f"pretrained_saes.yaml in SAELens's list:\n# SAE.from_pretrained('{cfg.release}', "
        f"'{first}')\n```\n"
    )


def export_saelens(cfg: ExportConfig, suite: LoadedSuite, tmp: Path) -> dict[str, Any]:
    """Write the release folder into `tmp` (empty); returns its yaml entry."""
    missing = [
        name
        for name, folder in suite.folders.items()
        if not (folder / SPARSITY_FILE).is_file()
        or not {"l0", "fvu"} <= set(suite.sae_configs[name].get("metadata", {}))
    ]
    measured = heldout_pass(cfg, suite, missing) if missing else {}
    np = cfg.neuronpedia
    entries = []
    for hp in suite.hookpoints:
        name, folder = hp.name, suite.folders[hp.name]
        cfg_json = json.loads(json.dumps(suite.sae_configs[name]))
        metadata = cfg_json.setdefault("metadata", {})
        dest = tmp / name
        dest.mkdir()
        shutil.copy2(folder / WEIGHTS_FILE, dest / WEIGHTS_FILE)
        if name in measured:
            res = measured[name]
            density = torch.tensor(res["latent_fire_counts"], dtype=torch.float64) / res["tokens"]
            save_sparsity(dest, density)
            metadata.update(sparsity_source="export_heldout", sparsity_tokens=res["tokens"])
        else:
            shutil.copy2(folder / SPARSITY_FILE, dest / SPARSITY_FILE)
            metadata.setdefault("sparsity_source", "saved")
            metadata.setdefault("sparsity_tokens", metadata.get("eval_tokens"))
        (dest / CFG_FILE).write_text(json.dumps(cfg_json, indent=2))
        np_id = (
            neuronpedia_id(np.model_id, np.source_set or cfg.release, hp) if np.model_id else None
        )
        entries.append(sae_entry(hp, metadata, measured.get(name), np_id))
    entry = release_entry(cfg, suite, entries)
    (tmp / YAML_FILE).write_text(yaml.safe_dump(entry, sort_keys=False))
    (tmp / "README.md").write_text(model_card(cfg, suite, entry))
    return entry

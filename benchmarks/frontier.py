"""The sparsity frontier: TopK, BatchTopK and JumpReLU at L0 16, 32 and 64 on two hookpoints of
the embedded model, all trained on the same activations; held-out FVU, L0 and delta loss.

    python -m benchmarks.frontier capture --out /work/acts/frontier.safetensors
    python -m benchmarks.frontier train --acts /work/acts/frontier.safetensors --runs runs/seed0
    python -m benchmarks.frontier train --acts /work/acts/frontier.safetensors --runs runs/seed1 \
        --extra train.seed=1
    python -m benchmarks.frontier evaluate --runs runs/seed0 runs/seed1
    python -m benchmarks.frontier quick --acts /work/acts/frontier.safetensors --runs runs/seed0
    python -m benchmarks.frontier table --runs runs/seed0 runs/seed1  # Markdown tables + PNGs

`capture` runs the producer (sequence pool, masks and outlier filter of `python -m
sae_dist.train`) over the training split once and saves float32 activations of every hookpoint,
so that every run sees the same tokens in the same order. `train` trains each (hookpoint,
architecture, L0) with `SuiteTrainer` (the trainer of the real entry point) on those
activations and saves the folded SAE; `evaluate` scores each saved SAE on the same held-out
chats with `sae_dist.evaluate` (FVU, L0, delta loss with the reconstruction spliced in, its
standard error over sequences); `quick` prints FVU, L0 and the part of L0 that dense latents
carry on the activation rows no run trained on (no LM, seconds); `table` also compares each
architecture with the TopK of the same runs folder pairwise on the same held-out sequences
(`sae_dist.evaluate.model_level.paired_delta`), per folder and averaged over folders
(seeds). Every stage skips what is done, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sae_dist.checkpoint import load_sae, save_sae
from sae_dist.cli import _compose
from sae_dist.config import (
    DataConfig,
    SitesConfig,
    TrainConfig,
    TrainRunConfig,
    l0_overrides,
    register_configs,
)
from sae_dist.data import SequencePool, TokenStream
from sae_dist.evaluate.evaluator import evaluate_saes, scalar_metrics
from sae_dist.evaluate.model_level import paired_delta
from sae_dist.evaluate.reconstruction import frequency_metrics
from sae_dist.hookpoints import Hookpoint, grid_hookpoints
from sae_dist.models import load_model
from sae_dist.producer import ActivationProducer
from sae_dist.sae import SparseAutoencoder
from sae_dist.suite import model_config_for
from sae_dist.train.suite_trainer import SuiteTrainer

MODEL = "smollm2-135m-instruct"
"""The embedded model (conf/model/smollm2-135m-instruct.yaml)."""
HOOKPOINTS = ["layers.12.resid", "layers.12.mlp"]
ARCHS = ["topk", "batchtopk", "jumprelu"]
L0S = [16, 32, 64]
log = logging.getLogger("frontier")


def capture(args: argparse.Namespace) -> None:
    """Producer activations of the training split at HOOKPOINTS -> one safetensors file
    {hookpoint: float32 [N, d_model]} (N >= --tokens)."""
    if args.out.exists():
        log.info("%s exists; nothing to capture", args.out)
        return
    model, tokenizer = load_model(model_config_for(MODEL))
    hps = grid_hookpoints(SitesConfig(hookpoints=HOOKPOINTS), 30)
    stream = SequencePool(
        TokenStream(DataConfig(), tokenizer, "train"), TrainConfig().sequence_pool, seed=0
    )
    producer = ActivationProducer(
        model, hps, DataConfig().policy.outlier_factor, torch.device("cpu"), {0: stream}, args.seqs
    )
    parts: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in hps}
    n = 0
    with tqdm(total=args.tokens, desc="capture", unit="tok") as bar, torch.no_grad():
        while n < args.tokens:
            batches = producer.next_batches()
            if batches is None:
                raise RuntimeError(f"training split ran out after {n} tokens")
            acts = producer.activations(batches)[0]
            for name, x in acts.items():
                parts[name].append(x)
            n += next(iter(acts.values())).shape[0]
            bar.update(next(iter(acts.values())).shape[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.cat(v).contiguous() for k, v in parts.items()}, str(args.out))
    log.info("saved %d tokens per hookpoint to %s (dropped: %s)", n, args.out, producer.dropped())


def run_overrides(hookpoint: str, arch: str, l0: int, tokens: int) -> list[str]:
    """The Hydra overrides of one frontier run (`python -m sae_dist.train` spelling): the
    demo's settings with the architecture aimed at L0 = l0."""
    return [
        "experiment=demo",
        f"sites.hookpoints=[{hookpoint}]",
        f"sae={arch}",
        *l0_overrides(arch, l0),
        f"train.tokens={tokens}",
        "logger=none",
    ]


def train_config(overrides: list[str]) -> TrainRunConfig:
    """TrainRunConfig of conf/train.yaml plus Hydra overrides."""
    register_configs()
    cfg, _ = _compose("train", overrides)
    return OmegaConf.to_object(cfg)


def shuffled(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The rows of x [N, d] in a fixed random order (the same for every run)."""
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))]


def train_sae(acts: torch.Tensor, cfg: TrainRunConfig) -> tuple[SparseAutoencoder, list[dict]]:
    """Train cfg's one SAE with `SuiteTrainer` on consecutive batches of acts [N, d] (raw
    activations, N >= train.tokens) -> (the folded SAE in eval mode, per-step metrics)."""
    hp = grid_hookpoints(cfg.sites, cfg.model.n_layers)[0]
    trainer = SuiteTrainer([hp], cfg, acts.shape[1], Accelerator(cpu=True))
    b, history = cfg.train.batch_size, []
    for step in tqdm(range(trainer.n_steps), desc=f"{cfg.sae.architecture} {hp.name}", leave=False):
        metrics = trainer.step({hp.name: acts[step * b : (step + 1) * b]})[hp.name]
        history.append({k: float(v) for k, v in metrics.items()})
    return trainer.folded_saes()[hp.name].eval(), history


@torch.no_grad()
def quick_metrics(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float]:
    """Metrics of an eval-mode SAE on raw activations x [N, d] (no LM needed): FVU, mean L0 and
    the latent-frequency metrics of sae_dist.evaluate (dead_frac, dense_frac, dense_l0) over
    the N rows."""
    latents = sae.encode(x)
    x_hat = sae.decode(latents)
    return {
        "fvu": float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
        "l0": float(latents.l0().mean()),
        **frequency_metrics(latents.fire_counts().double() / x.shape[0]),
    }


def run_dir(runs: Path, hookpoint: str, arch: str, l0: int) -> Path:
    return runs / f"{hookpoint}_{arch}_l0{l0}"


def grid(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(hookpoint, architecture, L0) of every run, L0 first so a partial sweep has whole rows."""
    return [(hp, arch, l0) for l0 in args.l0s for hp in args.hookpoints for arch in args.archs]


def train(args: argparse.Namespace) -> None:
    """Train every run of the grid that has no saved SAE yet (same activations, same order):
    SAE folder `<runs>/<hookpoint>_<arch>_l0<L0>/sae`, `train.json` with the training curve."""
    if len(args.runs) != 1:
        raise SystemExit("train takes one --runs folder (one seed: --extra train.seed=N)")
    acts = load_file(str(args.acts))
    for hp, arch, l0 in tqdm(grid(args), desc="frontier runs"):
        out = run_dir(args.runs[0], hp, arch, l0)
        if (out / "train.json").exists():
            continue
        overrides = run_overrides(hp, arch, l0, args.tokens) + args.extra
        x = shuffled(acts[hp])
        if x.shape[0] < args.tokens:
            raise ValueError(f"{args.acts} holds {x.shape[0]} tokens of {hp}; need {args.tokens}")
        cfg = train_config(overrides)
        start = time.perf_counter()
        sae, history = train_sae(x[: args.tokens], cfg)
        save_sae(
            sae,
            out / "sae",
            {"hookpoint": hp, "model_name": cfg.model.name, "overrides": overrides},
        )
        (out / "train.json").write_text(
            json.dumps(
                {
                    "overrides": overrides,
                    "minutes": (time.perf_counter() - start) / 60,
                    "load": os.getloadavg(),
                    "history": history,
                }
            )
        )
        log.info(
            "%s %s L0 %d: train FVU %.3f L0 %.1f",
            hp,
            arch,
            l0,
            history[-1]["fvu"],
            history[-1]["l0"],
        )


def evaluate(args: argparse.Namespace) -> None:
    """Held-out metrics (sae_dist.evaluate: FVU, L0, delta loss and its standard error, ...) of
    every trained run without `eval.json`, on the same held-out chats, with the per-sequence CE
    changes for paired comparisons; the SAEs of one (architecture, L0) are spliced one at a
    time in one pass over the batches."""
    model, tokenizer = load_model(model_config_for(MODEL))
    batches = list(TokenStream(DataConfig(), tokenizer, "eval").batches_until(args.eval_tokens, 8))
    for runs in args.runs:
        for arch in args.archs:
            for l0 in args.l0s:
                todo = {Hookpoint.parse(hp): run_dir(runs, hp, arch, l0) for hp in args.hookpoints}
                todo = {
                    hp: d
                    for hp, d in todo.items()
                    if (d / "train.json").exists() and not (d / "eval.json").exists()
                }
                if not todo:
                    continue
                saes = {hp: load_sae(d / "sae")[0].eval() for hp, d in todo.items()}
                results = evaluate_saes(
                    model,
                    saes,
                    batches,
                    torch.device("cpu"),
                    outlier_factor=DataConfig().policy.outlier_factor,
                )
                for hp, d in todo.items():
                    scalars = scalar_metrics(results[hp.name])
                    (d / "eval.json").write_text(
                        json.dumps(
                            {
                                **scalars,
                                "delta_loss_by_sequence": results[hp.name][
                                    "delta_loss_by_sequence"
                                ],
                            }
                        )
                    )
                    log.info("%s %s L0 %d: %s", hp.name, arch, l0, scalars)


def quick(args: argparse.Namespace) -> None:
    """Print a Markdown table of `quick_metrics` of every trained run on the rows of the
    activation file that no run trained on (those after `--tokens` in the shuffled order): seconds
    per SAE, no LM."""
    acts = load_file(str(args.acts))
    held = {hp: shuffled(acts[hp])[args.tokens :] for hp in args.hookpoints}
    print("| runs | hookpoint | arch | target L0 | L0 | FVU | never | dense frac | dense L0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for runs in args.runs:
        for hp, arch, l0 in grid(args):
            d = run_dir(runs, hp, arch, l0)
            if not (d / "train.json").exists():
                continue
            m = quick_metrics(load_sae(d / "sae")[0].eval(), held[hp])
            print(
                f"| {runs.name} | {hp} | {arch} | {l0} | {m['l0']:.1f} | {m['fvu']:.4f} | "
                f"{m['dead_frac']:.3f} | {m['dense_frac']:.4f} | {m['dense_l0']:.2f} |"
            )


def rows(args: argparse.Namespace) -> list[dict]:
    """One dict per evaluated run: runs folder, hookpoint, arch, target L0, held-out metrics
    (with the per-sequence record), minutes."""
    out = []
    for runs in args.runs:
        for hp, arch, l0 in grid(args):
            d = run_dir(runs, hp, arch, l0)
            if (d / "eval.json").exists():
                minutes = json.loads((d / "train.json").read_text())["minutes"]
                out.append(
                    {
                        "runs": runs.name,
                        "hookpoint": hp,
                        "arch": arch,
                        "target": l0,
                        "minutes": minutes,
                        **json.loads((d / "eval.json").read_text()),
                    }
                )
    return out


def versus_topk(found: list[dict]) -> list[dict]:
    """Per (hookpoint, arch != topk, target L0): the paired delta-loss difference to TopK, run
    by run (same runs folder: same seed and held-out sequences) and averaged over the runs
    folders per sequence, each with its sequence-clustered standard error (`paired_delta`)."""
    topk = {(r["runs"], r["hookpoint"], r["target"]): r for r in found if r["arch"] == "topk"}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in found:
        base = topk.get((r["runs"], r["hookpoint"], r["target"]))
        if r["arch"] != "topk" and base is not None:
            groups.setdefault((r["hookpoint"], r["arch"], r["target"]), []).append((r, base))
    out = []
    for (hp, arch, l0), pairs in groups.items():
        seqs = [(r["delta_loss_by_sequence"], b["delta_loss_by_sequence"]) for r, b in pairs]
        diff, se = paired_delta(
            _mean_record([a for a, _ in seqs]), _mean_record([b for _, b in seqs])
        )
        base = sum(b["delta_loss"] for _, b in pairs) / len(pairs)
        out.append(
            {
                "hookpoint": hp,
                "arch": arch,
                "target": l0,
                "runs": len(pairs),
                "topk_delta": base,
                "diff": diff,
                "se": se,
                "per_run": [
                    paired_delta(*s)[0] / b["delta_loss"] for s, (_, b) in zip(seqs, pairs)
                ],
                "fvu_diff": sum(r["fvu"] / b["fvu"] - 1 for r, b in pairs) / len(pairs),
            }
        )
    return out


def _mean_record(records: list[dict]) -> dict:
    """The per-sequence mean of `delta_loss_by_sequence` records of the same sequences."""
    return {
        "positions": records[0]["positions"],
        "delta_sum": [sum(v) / len(records) for v in zip(*(r["delta_sum"] for r in records))],
    }


def table(args: argparse.Namespace) -> None:
    """Markdown tables of every evaluated run and of the paired comparison with TopK, and per
    hookpoint a PNG of delta loss (mean over the runs folders) and FVU against held-out L0
    (benchmarks/frontier_<hookpoint>.png)."""
    found = rows(args)
    print(
        "| runs | hookpoint | arch | target L0 | L0 | FVU | delta loss (nats) | "
        "loss recovered | dead frac | train (min) |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in found:
        print(
            f"| {r['runs']} | {r['hookpoint']} | {r['arch']} | {r['target']} | {r['l0']:.1f} | "
            f"{r['fvu']:.4f} | {r['delta_loss']:.4f} ± {r['delta_loss_se']:.4f} | "
            f"{r['loss_recovered']:.3f} | {r['dead_frac']:.3f} | {r['minutes']:.1f} |"
        )
    print(
        "\n| hookpoint | arch | target L0 | runs | TopK delta loss | difference (nats) | "
        "difference / TopK | per run | FVU vs TopK |\n|---|---|---|---|---|---|---|---|---|"
    )
    for c in versus_topk(found):
        per_run = " / ".join(f"{100 * v:+.1f}" for v in c["per_run"])
        print(
            f"| {c['hookpoint']} | {c['arch']} | {c['target']} | {c['runs']} | "
            f"{c['topk_delta']:.4f} | {c['diff']:+.4f} ± {c['se']:.4f} | "
            f"{100 * c['diff'] / c['topk_delta']:+.1f} ± "
            f"{100 * c['se'] / c['topk_delta']:.1f} % | "
            f"{per_run} % | {100 * c['fvu_diff']:+.1f} % |"
        )
    plot(args, found)


def plot(args: argparse.Namespace, found: list[dict]) -> None:
    """Per hookpoint: delta loss and FVU (means over the runs folders) against held-out L0; the
    error bars are one standard error of the mean delta loss (the folders' `delta_loss_se`
    combined as independent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.plots.mkdir(parents=True, exist_ok=True)
    for hp in args.hookpoints:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for arch in args.archs:
            pts = []
            for l0 in args.l0s:
                rs = [
                    r for r in found if (r["hookpoint"], r["arch"], r["target"]) == (hp, arch, l0)
                ]
                if rs:
                    se = math.sqrt(sum(r["delta_loss_se"] ** 2 for r in rs)) / len(rs)
                    pts.append(
                        (
                            *(sum(r[k] for r in rs) / len(rs) for k in ("l0", "delta_loss", "fvu")),
                            se,
                        )
                    )
            if not pts:
                continue
            l0, delta, fvu_, se = zip(*pts)
            axes[0].errorbar(l0, delta, yerr=se, fmt="o-", capsize=3, label=arch)
            axes[1].plot(l0, fvu_, "o-", label=arch)
        for ax, name in zip(axes, ["delta loss (nats)", "FVU"]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("held-out L0")
            ax.set_ylabel(name)
            ax.legend()
        fig.suptitle(
            f"{hp}: {args.tokens:,} training tokens per SAE, mean of {len(args.runs)} run folder(s)"
        )
        fig.tight_layout()
        fig.savefig(args.plots / f"frontier_{hp.replace('.', '_')}.png", dpi=100)
        plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("capture", help="save the training activations once")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--tokens", type=int, default=210_000)
    c.add_argument("--seqs", type=int, default=16)
    for name, help_ in [
        ("train", "train the missing runs"),
        ("evaluate", "evaluate them"),
        ("quick", "FVU, L0, dense latents on the untrained rows of --acts"),
        ("table", "print the table and write the plots"),
    ]:
        q = sub.add_parser(name, help=help_)
        q.add_argument(
            "--runs",
            type=Path,
            nargs="+",
            required=True,
            help="runs folders (one per seed: --extra train.seed=N)",
        )
        q.add_argument("--acts", type=Path, default=Path("/work/acts/frontier.safetensors"))
        q.add_argument("--tokens", type=int, default=200_000)
        q.add_argument(
            "--eval-tokens",
            type=int,
            default=40_000,
            help="held-out positions to evaluate on (40k: 160 chats; on 10k the MLP "
            "output's delta loss carries a 13-17 %% standard error)",
        )
        q.add_argument("--hookpoints", nargs="+", default=HOOKPOINTS)
        q.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
        q.add_argument("--l0s", nargs="+", type=int, default=L0S)
        q.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides per run")
        q.add_argument("--plots", type=Path, default=Path(__file__).parent)
    return p.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    {"capture": capture, "train": train, "evaluate": evaluate, "quick": quick, "table": table}[
        args.mode
    ](args)


if __name__ == "__main__":
    main()

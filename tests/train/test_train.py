"""End-to-end training on the tiny Qwen3 with the real offline chat data: the suite on disk,
its metadata, the W&B offline run, honest held-out metrics, and exact resume."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from sae_dist.checkpoint import load_suite_sae, read_suite_index
from sae_dist.data import TokenStream
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.models import load_model
from sae_dist.producer import ActivationProducer
from sae_dist.train import train
from tests.conftest import PRECISION, compose_train_config

TINY = [
    "model=tiny-qwen3",
    "sites.layers=[1,3]",
    "sites.sites=[resid,mlp]",
    "sae.expansion=4",
    "sae.k=8",
    "sae.dead_tokens=2048",
    "train.tokens=4096",
    "train.batch_size=256",
    "train.forward_batch_seqs=4",
    "train.buffer_batches=4",
    "train.eval_tokens=1000",
    "train.log_every=1",
    "data.context_size=64",
    "train.lr=0.001",
    *PRECISION["fp32"],
]
"""fp32 unless a test adds PRECISION["bf16"] (later overrides win)."""


def tiny_run(out_dir: Path, *extra: str):
    return compose_train_config(TINY + [f"out_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_run(out, "logger=wandb", "logger.mode=offline")
    return cfg, train(cfg), out


def test_suite_on_disk(trained):
    cfg, results, out = trained
    index = read_suite_index(out / "suite")
    names = [e["hookpoint"] for e in index["saes"]]
    assert names == ["layers.1.resid", "layers.1.mlp", "layers.3.resid", "layers.3.mlp"]
    for name in names:
        sae, sae_cfg = load_suite_sae(out / "suite", name)
        meta = sae_cfg["metadata"]
        assert meta["hookpoint"] == name and meta["layer"] == int(name.split(".")[1])
        assert meta["site"] == name.split(".")[2]
        assert meta["training_tokens"] == 4096
        assert meta["fvu"] == pytest.approx(results[name]["fvu"])
        assert 0 < meta["fvu"] < 1 and 0 < meta["l0"] <= 8 and 0 <= meta["dead_frac"] <= 1
        assert (sae.d_in, sae.d_sae, sae_cfg["k"]) == (64, 256, 8)
    report = (out / "report.md").read_text()
    assert "| layers.3.mlp |" in report
    assert "token policy positions=all, outliers > 10x median norm left out" in report


def test_wandb_offline_run_and_curve(trained):
    _, _, out = trained
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fvu = [r["layers.1.resid/fvu"] for r in rows if "layers.1.resid/fvu" in r]
    assert len(fvu) >= 5
    assert min(fvu[-3:]) < fvu[0]  # training reduces the reconstruction error
    assert all("tokens_per_s" in r and "layers.1.resid/outliers_dropped" in r for r in rows)
    assert (out / "fvu_curve.png").stat().st_size > 10_000


def test_reported_fvu_matches_an_independent_computation(trained):
    """Recompute held-out FVU/L0 with plain code from the saved SAE and fresh captures."""
    cfg, results, out = trained
    model, tokenizer = load_model(cfg.model)
    hp = Hookpoint(3, "resid")
    sae, _ = load_suite_sae(out / "suite", hp.name)
    stream = TokenStream(cfg.data, tokenizer, "eval")
    xs = []
    for batch in stream.batches(cfg.train.forward_batch_seqs):
        xs.append(capture(model, [hp], batch.input_ids)[hp][batch.train_mask])
        if sum(len(x) for x in xs) >= cfg.train.eval_tokens:
            break
    x = torch.cat(xs).double()
    with torch.no_grad():
        pre = (x - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
        top = pre.topk(8, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        x_hat = z @ sae.W_dec.double() + sae.b_dec.double()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert results[hp.name]["tokens"] == len(x)
    assert results[hp.name]["fvu"] == pytest.approx(float(fvu), rel=1e-4)
    assert results[hp.name]["l0"] == pytest.approx(float((z > 0).sum(1).double().mean()), rel=1e-6)


def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    reference = tmp_path / "uninterrupted"
    train(tiny_run(reference, "logger=none"))

    resumed = tmp_path / "killed"
    calls = {"n": 0}
    original = ActivationProducer.activations

    def dies_on_call_seven(self, batches):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batches)

    monkeypatch.setattr(ActivationProducer, "activations", dies_on_call_seven)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(resumed, "logger=none", "train.checkpoint_every=2"))
    assert (resumed / "checkpoint" / "run.pt").exists()
    assert not (resumed / "suite").exists()
    monkeypatch.setattr(ActivationProducer, "activations", original)
    train(tiny_run(resumed, "logger=none", "train.checkpoint_every=2"))
    for name in ["layers.1.resid", "layers.3.mlp"]:
        a, _ = load_suite_sae(reference / "suite", name)
        b, _ = load_suite_sae(resumed / "suite", name)
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_embedded_smollm2_trains_from_real_chats(tmp_path):
    """The demo's model and data path for real (GGUF dequantised and cached, ChatML template),
    on a tiny budget: every hookpoint gets its tokens and a held-out FVU below that of the mean."""
    cfg = compose_train_config(
        [
            "experiment=demo",
            *PRECISION["fp32"],
            "logger=none",
            f"out_dir={tmp_path}",
            "sites.layers=[3]",
            "sae.expansion=2",
            "sae.k=16",
            "train.tokens=4096",
            "train.batch_size=512",
            "train.buffer_batches=4",
            "train.forward_batch_seqs=4",
            "train.eval_tokens=1000",
        ]
    )
    results = train(cfg)
    assert list(results) == ["layers.3.resid", "layers.3.mlp", "layers.3.attn"]
    for res in results.values():
        assert 0 < res["fvu"] < 1 and res["l0"] <= 16 and res["tokens"] >= 1000
    meta = load_suite_sae(tmp_path / "suite", "layers.3.attn")[1]["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_attn_out"
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_eval_tokens_0_saves_the_suite_unevaluated(tmp_path):
    train(tiny_run(tmp_path, "logger=none", "train.eval_tokens=0", "train.tokens=1024"))
    index = read_suite_index(tmp_path / "suite")
    assert index["evaluated"] is False and len(index["saes"]) == 4
    sae, cfg = load_suite_sae(tmp_path / "suite", "layers.1.resid")
    assert cfg["metadata"]["training_tokens"] == 1024 and "fvu" not in cfg["metadata"]
    assert cfg["metadata"]["input_scale"] > 0
    assert not (tmp_path / "eval").exists()


# --- trustworthy runs: resume in every phase, config checks, complete runs, data checks ------

PHASED = [
    "train.lr_warmup_frac=0.4",
    "train.lr_decay_frac=0.4",
    "train.checkpoint_every=1",
    "train.eval_tokens=0",
]
"""16 steps: warm-up over steps 0-5, constant 6-9, decay 10-15; a checkpoint every forward; no
evaluation (the runs are compared by their checkpoints; evaluating took most of their time)."""


def killed_at(monkeypatch, call: int):
    """Make the `call`-th producer forward raise KeyboardInterrupt (a kill); returns undo."""
    calls, original = {"n": 0}, ActivationProducer.activations

    def dies(self, batches):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batches)

    monkeypatch.setattr(ActivationProducer, "activations", dies)
    return lambda: monkeypatch.setattr(ActivationProducer, "activations", original)


def final_state(out: Path, name: str) -> dict:
    return torch.load(out / "checkpoint" / "saes" / f"{name}.pt", weights_only=False)


def assert_same_final_state(reference: Path, out: Path, names: list[str], steps: int) -> None:
    """The last checkpoints of two runs hold `steps` steps and bit-identical SAE weights and
    Adam moments for every SAE of `names`."""
    for name in names:
        ref, got = final_state(reference, name), final_state(out, name)
        assert got["step_count"] == ref["step_count"] == steps
        for key, value in ref["sae"].items():
            torch.testing.assert_close(got["sae"][key], value, rtol=0, atol=0)
        for pname, moments in ref["adam"].items():
            for key, value in moments.items():
                torch.testing.assert_close(got["adam"][pname][key], value, rtol=0, atol=0)


@pytest.fixture(scope="module", params=sorted(PRECISION))
def phased(request, tmp_path_factory) -> tuple[list[str], Path]:
    """(overrides, uninterrupted run's out_dir) of the phased run in each precision (bf16:
    LM in bfloat16, SAE step under bf16 autocast)."""
    overrides = ["logger=none", *PHASED, *PRECISION[request.param]]
    out = tmp_path_factory.mktemp(f"phased-{request.param}")
    train(tiny_run(out, *overrides))
    return overrides, out


@pytest.mark.parametrize("kill_call, phase", [(8, "warm-up"), (12, "constant"), (17, "decay")])
def test_resume_in_every_lr_phase_equals_the_uninterrupted_run(
    tmp_path, monkeypatch, phased, kill_call, phase
):
    from sae_dist.train.suite_trainer import lr_factor

    overrides, phased_reference = phased
    undo = killed_at(monkeypatch, kill_call)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path, *overrides))
    step = final_state(tmp_path, "layers.1.resid")["step_count"]
    factor = lr_factor(step, 16, 0.4, 0.4)
    assert {
        "warm-up": 0 < step < 6,
        "constant": 6 <= step < 10 and factor == 1,
        "decay": 10 <= step < 16,
    }[phase], step
    undo()
    train(tiny_run(tmp_path, *overrides))
    assert_same_final_state(phased_reference, tmp_path, ["layers.1.resid", "layers.3.mlp"], 16)


def test_jumprelu_with_target_resumes_bitwise(tmp_path, monkeypatch):
    """JumpReLU's recipe state (data-initialised thresholds, the L0 controller's moves, the
    thresholds' own Adam group and learning rate) survives a kill: the resumed run's weights
    and Adam moments equal the uninterrupted run's bit for bit."""
    jumprelu = [o for o in TINY if not o.startswith("sae.k=")] + [
        "sae=jumprelu",
        "sae.target_l0=8",
        *PHASED,
    ]
    reference = tmp_path / "reference"
    train(compose_train_config(jumprelu + [f"out_dir={reference}", "logger=none"]))
    undo = killed_at(monkeypatch, 12)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(compose_train_config(jumprelu + [f"out_dir={killed}", "logger=none"]))
    assert 0 < final_state(killed, "layers.1.resid")["step_count"] < 16
    undo()
    train(compose_train_config(jumprelu + [f"out_dir={killed}", "logger=none"]))
    for name in ["layers.1.resid", "layers.3.mlp"]:
        ref, got = final_state(reference, name), final_state(killed, name)
        assert set(ref["adam"]) == {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}
        for key, value in ref["sae"].items():
            torch.testing.assert_close(got["sae"][key], value, rtol=0, atol=0)
        for pname, moments in ref["adam"].items():
            for key, value in moments.items():
                torch.testing.assert_close(got["adam"][pname][key], value, rtol=0, atol=0)


@pytest.fixture
def stop_signals_restored():
    """The stop signals' handlers as they were before the test (a run that stopped leaves them
    ignored, for the rest of its process)."""
    from sae_dist.preemption import STOP_SIGNALS

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("phased", ["fp32"], indirect=True)
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_saves_that_step_and_the_restart_resumes_bitwise(
    tmp_path, monkeypatch, phased, stop_signals_restored, sig
):
    """SIGUSR1 (SLURM's time-limit warning) or SIGTERM (preemption) during the 12th forward batch
    of a run without periodic checkpoints: it finishes that step, saves a checkpoint there and
    exits with 75; the restart reaches the uninterrupted run's weights and Adam state bit for
    bit (that run saved a checkpoint after every forward batch: saving changes nothing)."""
    from sae_dist.preemption import REQUEUE_EXIT

    overrides, phased_reference = phased
    calls, original = {"n": 0}, ActivationProducer.activations

    def signalled(self, batches):
        calls["n"] += 1
        if calls["n"] == 12:
            os.kill(os.getpid(), sig)
        return original(self, batches)

    monkeypatch.setattr(ActivationProducer, "activations", signalled)
    cfg = tiny_run(tmp_path, *overrides, "train.checkpoint_every=0")
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == REQUEUE_EXIT
    steps_at_12 = final_state(tmp_path, "layers.1.resid")["step_count"]
    assert 6 <= steps_at_12 < 16  # the steps of 12 forward batches (not 0: nothing else saved)
    monkeypatch.setattr(ActivationProducer, "activations", original)
    assert signal.getsignal(sig) is signal.SIG_IGN  # the stopped process ignores the next one
    signal.signal(sig, signal.SIG_DFL)
    train(tiny_run(tmp_path, *overrides, "train.checkpoint_every=0"))
    assert_same_final_state(phased_reference, tmp_path, ["layers.1.resid", "layers.3.mlp"], 16)
    assert signal.getsignal(sig) is signal.SIG_DFL  # restored after the training loop


def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr("sae_dist.train.loop.load_model", refuse)


@pytest.mark.parametrize(
    "changed, key",
    [
        ("sae.k=4", "sae.k"),
        ("train.tokens=8192", "train.tokens"),
        ("sae.expansion=8", "sae.expansion"),
        ("data.policy.positions=content", "data.policy.positions"),
    ],
)
def test_a_checkpoint_of_another_config_is_refused_before_the_model_loads(
    tmp_path, monkeypatch, changed, key
):
    from sae_dist.checkpoint import CheckpointError

    undo = killed_at(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path, "logger=none", "train.checkpoint_every=2"))
    undo()
    no_model_load(monkeypatch)
    with pytest.raises(
        CheckpointError, match=rf"(?s){key}: .* in the checkpoint.*train\.resume=false"
    ):
        train(tiny_run(tmp_path, "logger=none", "train.checkpoint_every=2", changed))
    # settings that do not shape training may change on resume
    monkeypatch.undo()
    train(tiny_run(tmp_path, "logger=none", "train.checkpoint_every=3", "train.log_every=2"))
    assert (tmp_path / "suite" / "suite.json").exists()


def test_a_finished_run_rerun_says_complete_and_a_kill_in_evaluation_skips_training(
    tmp_path, monkeypatch, capsys
):
    from sae_dist.train import results as suite

    def killed_in_evaluation(*args, **kwargs):
        raise KeyboardInterrupt("killed during the evaluation")

    original = suite.evaluate_saes
    monkeypatch.setattr(suite, "evaluate_saes", killed_in_evaluation)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path, "logger=none"))
    assert not (tmp_path / "suite" / "suite.json").exists()
    assert final_state(tmp_path, "layers.1.resid")["step_count"] == 16
    monkeypatch.setattr(suite, "evaluate_saes", original)
    monkeypatch.setattr(
        "sae_dist.train.suite_trainer.SuiteTrainer.step", lambda *a: pytest.fail("retrained")
    )
    results = train(tiny_run(tmp_path, "logger=none"))
    assert set(results) == {"layers.1.resid", "layers.1.mlp", "layers.3.resid", "layers.3.mlp"}
    no_model_load(monkeypatch)
    capsys.readouterr()
    again = train(tiny_run(tmp_path, "logger=none"))
    assert "is complete" in capsys.readouterr().out
    assert again["layers.3.mlp"]["fvu"] == pytest.approx(results["layers.3.mlp"]["fvu"])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "usable document"),
        (b"\xff\xfe\x00garbage\xff" * 50, "UTF-8"),
        (b'{"nothing": 1}\n{"other": 2}\n', "usable document"),
    ],
)
def test_bad_data_files_fail_before_the_model_loads(tmp_path, monkeypatch, content, message):
    from sae_dist.errors import DataError

    source = tmp_path / "data.jsonl"
    if content is not None:
        source.write_bytes(content)
    no_model_load(monkeypatch)
    with pytest.raises(DataError, match=message):
        train(tiny_run(tmp_path / "run", "logger=none", f"data.source={source}"))


def test_too_short_data_says_so_and_keeps_a_checkpoint(tmp_path):
    from sae_dist.errors import DataError

    source = tmp_path / "short.jsonl"
    source.write_text(
        "".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(30))
    )
    with pytest.raises(DataError, match=r"ran out after \d+ of 4096 training tokens"):
        train(tiny_run(tmp_path / "run", "logger=none", f"data.source={source}"))
    assert (tmp_path / "run" / "checkpoint" / "run.pt").exists()


def wandb_history_steps(run_dir: Path) -> list[int]:
    """Steps of the history records in an offline W&B run's .wandb file (LevelDB-log framing:
    7-byte file header, 32 KiB blocks, records of crc32, length, type)."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, payloads, pending = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
    records = [Record.FromString(p) for p in payloads]
    return [r.history.step.num for r in records if r.HasField("history")]


def test_a_resumed_offline_wandb_run_holds_every_logged_step_once(tmp_path, monkeypatch):
    undo = killed_at(monkeypatch, 15)
    wandb = ["logger=wandb", "logger.mode=offline", "train.checkpoint_every=4"]
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path, *wandb))
    import wandb as wb

    wb.finish()  # the killed process's W&B run (a real kill ends it with the process)
    undo()
    train(tiny_run(tmp_path, *wandb))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    # log_every=1: one row per forward batch that took a step (2 steps in some), each once
    assert steps == sorted(set(steps)) and steps[-1] == 4096 and len(steps) >= 8
    assert wandb_history_steps(runs[0]) == steps

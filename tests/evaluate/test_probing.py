"""The probing evaluations (DESIGN.md section 8b): absorption's rules on hand-made rows and on a
planted dictionary whose absorption is known by construction, the first-letter prompts, sparse
probing's latent choice and accuracies, its tasks from a chat file, mean pooling on the tiny
model, and `python -m sae_dist.evaluate eval.probes=[...]` end to end."""

import csv
import json
import math

import pytest
import torch

from sae_dist.config import (
    AbsorptionConfig,
    DataConfig,
    SparseProbingConfig,
    register_configs,
    sae_config,
)
from sae_dist.errors import DataError
from sae_dist.evaluate.absorption import (
    LETTERS,
    WordSet,
    absorption_scores,
    prompt_ids,
    sae_absorption,
    sample_words,
    word_activations,
)
from sae_dist.evaluate.command import run_evaluation
from sae_dist.evaluate.probing import probe_columns
from sae_dist.evaluate.sparse_probing import (
    build_tasks,
    classify,
    pooled_features,
    probe_accuracies,
)
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.sae import build_sae
from tests.evaluate.test_evaluate import compose_eval, tiny_suite, topk_sae  # noqa: F401

ROOT2 = math.sqrt(2)


# ------------------------------------------------------------------------ absorption rules


def test_absorption_rules_on_hand_made_rows():
    """Each branch of the absorption fraction and of full absorption, with the probe direction
    e0 and decoder rows chosen so every projection is known."""
    d = 4
    e = torch.eye(d)
    # latent 0: main (decoder e0); 1, 2, 3: absorbers along e0 + e_i; 4: off-probe (cos 0.05)
    W_dec = torch.stack(
        [
            e[0],
            (e[0] + e[1]) / ROOT2,
            (e[0] + e[2]) / ROOT2,
            (e[0] + e[3]) / ROOT2,
            0.05 * e[0] + math.sqrt(1 - 0.05**2) * e[1],
        ]
    )
    cfg = AbsorptionConfig(max_absorbers=2)
    x = torch.tensor([[3.0, 0, 0, 0]] * 6)  # P = 3 for every row; 0.4 P = 1.2
    z = torch.tensor(
        [
            [3.0, 0, 0, 0, 0],  # the main latent carries all: M = 3 >= P -> 0
            [1.0, 1.0, 0, 0, 0],  # A = 0.71 < 0.4 P -> 0
            [0.0, 2 * ROOT2, ROOT2, ROOT2, 0],  # M = 0, A = 3 -> 1; top latent p = 2: full
            [1.0, 1.5 * ROOT2, 0, 0, 0],  # M = 1, A = 1.5, a = min(1.5, 2) -> 1.5 / 2.5
            [0.0, 0, 0, 0, 30.0],  # p = 1.5 but cos 0.05 < 0.1: no absorber; full (>= 0.025)
            [0.5, ROOT2, ROOT2, ROOT2, 0],  # three absorbers, two count: a = 2 -> 2 / 2.5
        ]
    )
    fraction, full = absorption_scores(x, z, W_dec, torch.tensor([2.0, 0, 0, 0]), [0], cfg)
    assert fraction.tolist() == pytest.approx([0, 0, 1, 0.6, 0, 0.8])
    assert full.tolist() == [False, False, True, False, True, False]
    # full absorption needs the top latent's cosine >= full_cos, and P >= 0
    strict = AbsorptionConfig(full_cos=0.06)
    assert absorption_scores(x[4:5], z[4:5], W_dec, e[0], [0], strict)[1].tolist() == [False]
    negative = absorption_scores(-x[2:3], z[2:3], W_dec, e[0], [0], cfg)
    assert negative[0].tolist() == [0.0] and negative[1].tolist() == [False]


def planted_dictionary(n_abs: int = 6, n_part: int = 5, per_letter: int = 100, n_train: int = 70):
    """Four letters on e0..e3 (x = 3 e_c + 0.1 noise on dims 40..63) and a ReLU SAE built so
    that the absorption is known:
    - letter a: main latent 0; the first n_abs test words also carry their own token direction
      g_w, which switches latent 0 off and fires an absorbing latent with decoder
      (e0 + g_w) / sqrt2 -> full absorption, fraction 1, on exactly those words;
    - letter b: main latent 1; the first n_part test words carry h_w, on which latent 1 fires
      at 1 (not 2) and an absorber fires at 2 -> fraction sqrt2 / (sqrt2 + 1), not full;
    - letter c: split in two latents (2 and 3) by the sign of dim 4; letter d: latent 4.
    Returns (x [n, 64], WordSet, SAE)."""
    gen = torch.Generator().manual_seed(0)
    d_in, d_sae = 64, 32
    letters = torch.arange(4).repeat_interleave(per_letter)
    x = torch.zeros(len(letters), d_in)
    x[:, 40:] = 0.1 * torch.randn(len(letters), 24, generator=gen)
    x[torch.arange(len(letters)), letters] = 3.0
    test_start = [c * per_letter + n_train for c in range(4)]
    c_words = torch.arange(2 * per_letter, 3 * per_letter)
    x[c_words, 4] = torch.where(c_words % 2 == 0, 3.0, -3.0)
    W_enc, b_enc, W_dec = torch.zeros(d_in, d_sae), -torch.ones(d_sae), torch.zeros(d_sae, d_in)
    for c, latent in ((0, 0), (1, 1), (3, 4)):
        W_enc[c, latent], W_dec[latent, c] = 1.0, 1.0
    for latent, sign in ((2, 1.0), (3, -1.0)):
        W_enc[2, latent], W_enc[4, latent], b_enc[latent] = 1.0, sign, -4.0
        W_dec[latent, 2] = 1.0
    latent = 5
    for i in range(n_abs):  # absorbed words of letter a: dims 5.. and latents 5..
        dim, row = 5 + i, test_start[0] + i
        x[row, dim] = 3.0
        W_enc[dim, 0] = -2.0
        W_enc[dim, latent], W_dec[latent, 0], W_dec[latent, dim] = 1.0, 1 / ROOT2, 1 / ROOT2
        latent += 1
    for i in range(n_part):  # partly absorbed words of letter b: dims 20..
        dim, row = 20 + i, test_start[1] + i
        x[row, dim] = 3.0
        W_enc[dim, 1] = -1 / 3
        W_enc[dim, latent], W_dec[latent, 1], W_dec[latent, dim] = 1.0, 1 / ROOT2, 1 / ROOT2
        latent += 1
    for spare in range(latent, d_sae):  # never fire; unit decoders in the noise dims
        W_dec[spare, 40 + spare % 24] = 1.0
    sae = build_sae(sae_config("relu", d_sae=d_sae), d_in).eval()
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.zero_()
    train = (torch.arange(len(letters)) % per_letter) < n_train
    words = WordSet(list(range(len(letters))), ["w"] * len(letters), letters, train)
    return x, words, sae


def test_absorption_known_by_construction():
    n_abs, n_part, n_test = 6, 5, 30
    x, words, sae = planted_dictionary(n_abs, n_part)
    res = sae_absorption(sae, x, words, AbsorptionConfig(max_k=4))
    by_letter = {r["letter"]: r for r in res["absorption_by_letter"]}
    assert list(by_letter) == ["a", "b", "c", "d"]
    for r in by_letter.values():  # the probe finds every test word of its letter
        assert r["probe_f1"] == 1.0 and r["true_positives"] == n_test and r["evaluated"]
    assert by_letter["a"]["main_latents"] == [0] and by_letter["b"]["main_latents"] == [1]
    assert sorted(by_letter["c"]["main_latents"]) == [2, 3]  # a split letter
    assert by_letter["d"]["main_latents"] == [4]
    assert by_letter["a"]["absorption"] == pytest.approx(n_abs / n_test, abs=1e-12)
    assert by_letter["a"]["full_absorption"] == pytest.approx(n_abs / n_test, abs=1e-12)
    partial = ROOT2 / (ROOT2 + 1)
    assert by_letter["b"]["absorption"] == pytest.approx(n_part / n_test * partial, rel=1e-6)
    assert by_letter["b"]["full_absorption"] == 0
    assert by_letter["c"]["absorption"] == by_letter["d"]["absorption"] == 0
    assert res["absorption_letters"] == 4 and res["split_latents"] == pytest.approx(5 / 4)
    assert res["absorption"] == pytest.approx((n_abs / n_test + n_part / n_test * partial) / 4)
    assert res["full_absorption"] == pytest.approx(n_abs / n_test / 4)
    # a letter whose probe finds too few test words is reported but not evaluated
    strict = sae_absorption(sae, x, words, AbsorptionConfig(max_k=4, min_true_positives=31))
    assert strict["absorption_letters"] == 0 and math.isnan(strict["absorption"])


def test_first_letter_prompts(smollm2_tokenizer, tiny_model):
    cfg = AbsorptionConfig(words=60, icl_examples=2, seed=3)
    words = sample_words(smollm2_tokenizer, cfg)
    assert len(set(words.ids)) == 60 and int(words.train.sum()) == 48
    for word_id, text, letter in zip(words.ids, words.texts, words.letters.tolist()):
        assert smollm2_tokenizer.decode([word_id]) == text
        assert text.strip().isalpha() and text.strip()[0].lower() == LETTERS[letter]
    prompts = prompt_ids(smollm2_tokenizer, words, cfg)
    for (ids, at), word_id, text in zip(prompts, words.ids, words.texts):
        assert ids[0] == smollm2_tokenizer.bos_token_id and ids[at] == word_id
        shown = smollm2_tokenizer.decode(ids[1:])
        assert shown.endswith(f"{text} has the first letter:") and shown.count("\n") == 2
        first, second = shown.split("\n")[:2]
        assert first.endswith(f": {first.split(' has')[0].strip()[0].upper()}")
        assert second.endswith(f": {second.split(' has')[0].strip()[0].upper()}")
    hp = Hookpoint(2, "resid")
    acts = word_activations(tiny_model, [hp], prompts[:5], 0, 2, torch.device("cpu"))[hp]
    for row, (ids, at) in enumerate(prompts[:5]):
        alone = capture(tiny_model, [hp], torch.tensor([ids]))[hp][0, at]
        torch.testing.assert_close(acts[row], alone, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- sparse probing


def test_sparse_probe_takes_the_latents_that_separate_the_classes():
    """Latent 7 fires on positives, latent 3 on negatives (|mean difference| ranks both), the
    rest is noise: k = 1 and 2 are exact, the dense probe on separable activations too, and a
    task of pure noise stays near chance."""
    gen = torch.Generator().manual_seed(0)
    n = 200
    y = torch.arange(n) < n // 2
    train = (torch.arange(n) % (n // 2)) < 60
    latents = 0.05 * torch.rand(n, 50, generator=gen)
    latents[y, 7] += 1.0
    latents[~y, 3] += 2.0
    acts = torch.randn(n, 16, generator=gen)
    acts[:, 0] += torch.where(y, 2.0, -2.0) * 3
    res = probe_accuracies(acts, latents, y, train, [1, 2])
    assert res["latents"]["1"] == [3] and sorted(res["latents"]["2"]) == [3, 7]
    assert res["k1"] == res["k2"] == res["dense"] == 1.0
    noise = probe_accuracies(
        torch.randn(n, 16, generator=gen), latents[torch.randperm(n)], y, train, [1]
    )
    assert 0.3 < noise["k1"] < 0.7 and 0.3 < noise["dense"] < 0.7


def test_task_rules():
    long_prose = "The river bends twice before the town. " * 8
    assert classify(
        "code",
        "assistant",
        "Try:\n```python\nprint('hello world, this is code')\nx = 1\n```\nDone",
        False,
    ) == (True, "print('hello world, this is code')\nx = 1")
    assert classify("code", "assistant", long_prose, False) == (False, long_prose[:400])
    assert (
        classify("code", "user", "```\nsome code that is long enough to count\n```", False) is None
    )
    assert (
        classify(
            "refusal", "assistant", "I'm sorry, but I cannot help with that request at all.", False
        )[0]
        is True
    )
    assert (
        classify(
            "refusal",
            "assistant",
            "I apologize for the confusion, here is the fix: " + long_prose,
            False,
        )
        is None
    )
    assert classify("refusal", "assistant", long_prose, False) == (False, long_prose[:400])
    assert classify("language", "user", "这是一个关于语言模型的问题，请帮我回答一下谢谢", False)[0]
    assert classify("language", "assistant", long_prose, False)[0] is False
    assert classify("language", "user", "Ça va très bien, merci beaucoup mon ami !", False) is None
    assert classify("harmful_request", "user", "What is the capital of France?", True) == (
        False,
        "What is the capital of France?",
    )
    assert classify("harmful_request", "user", "What is the capital of France?", False) is None


def test_tasks_from_a_chat_file_take_held_out_documents_first(tmp_path):
    lines = []
    for i in range(40):
        reply = (
            "I'm sorry, but I can't assist with that request, it is harmful."
            if i % 4 == 0
            else f"Sure. Here is a long answer number {i}. " * 6
        )
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(rec) for rec in lines))
    data = DataConfig(source=str(path), holdout_every=2, shuffle=False)  # file order: i = doc index
    (task,) = build_tasks(["refusal"], data, 8, 1000)
    # 10 refusals at i % 4 == 0, all in held-out documents (even i); complying replies: 10
    # held-out (i = 2, 6, ...) come first
    assert len(task.positives) == len(task.negatives) == 8 and task.heldout == [8, 8]
    assert all(p.startswith("I'm sorry") for p in task.positives)
    assert task.negatives[0].startswith("Sure. Here is a long answer number 2.")
    (task,) = build_tasks(["refusal"], data, 10, 1000)  # every refusal there is
    with pytest.raises(DataError, match="task refusal: 10 positive examples"):
        build_tasks(["refusal"], data, 11, 1000)
    no_holdout = DataConfig(source=str(path), holdout_every=1000, shuffle=False)
    (task,) = build_tasks(["refusal"], no_holdout, 5, 1000)
    assert task.heldout == [1, 0]  # only document 0 (a refusal) is held out


def test_pooling_is_the_mean_over_the_example_tokens(tiny_model):
    hp = Hookpoint(1, "resid")
    sae = topk_sae(0)
    rows = [[1, 50, 60, 70], [1, 80, 90], [1, 100, 110, 120, 130]]
    cfg = SparseProbingConfig(batch_seqs=2)
    acts, latents = pooled_features(tiny_model, {hp: sae}, rows, 1, cfg, torch.device("cpu"), None)
    for i, r in enumerate(rows):
        x = capture(tiny_model, [hp], torch.tensor([r]))[hp][0, 1:]
        torch.testing.assert_close(acts[hp][i], x.mean(0), rtol=1e-5, atol=1e-5)
        z = sae.encode(x).dense().mean(0)
        torch.testing.assert_close(latents[hp][i], z, rtol=1e-5, atol=1e-5)


def test_probe_columns_order():
    results = {
        "a": {
            "fvu": 1,
            "probe_k10_acc": 1,
            "probe_k2_acc": 1,
            "probe_dense_acc": 1,
            "absorption": 0,
            "full_absorption": 0,
        }
    }
    assert probe_columns(results) == (
        "absorption",
        "full_absorption",
        "probe_dense_acc",
        "probe_k2_acc",
        "probe_k10_acc",
    )


# ------------------------------------------------------------------------------ the CLI


def test_cli_probes_reach_the_tables_and_the_log(tiny_suite, smollm2_tokenizer, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    register_configs()
    cfg = compose_eval(
        [
            f"suite={tiny_suite}",
            f"out_dir={out}",
            "eval.tokens=60",
            "eval.batch_seqs=2",
            "data.context_size=40",
            "logger.mode=offline",
            "eval.probes=[absorption,sparse_probing]",
            "eval.absorption.words=120",
            "eval.sparse_probing.tasks=[harmful_request,code]",
            "eval.sparse_probing.train_per_class=10",
            "eval.sparse_probing.test_per_class=10",
            "eval.sparse_probing.max_tokens=16",
        ]
    )
    results = run_evaluation(cfg)
    names = ["layers.1.resid", "layers.1.mlp", "layers.1.attn", "layers.3.resid"]
    words = sample_words(smollm2_tokenizer, cfg.eval.absorption)
    letters = [
        c
        for i, c in enumerate(LETTERS)
        if int((words.letters[words.train] == i).sum()) >= 2
        and (words.letters[~words.train] == i).any()
    ]
    columns = (
        "absorption",
        "full_absorption",
        "split_latents",
        "absorption_letters",
        "probe_dense_acc",
        "probe_k1_acc",
        "probe_k2_acc",
        "probe_k5_acc",
    )
    with open(out / "suite_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(columns) <= set(rows[0])
    for name, row in zip(names, rows):
        doc = json.loads((out / "saes" / f"{name}.json").read_text())
        assert set(doc["sparse_probing_by_task"]) == {"harmful_request", "code"}
        for task in doc["sparse_probing_by_task"].values():
            assert 0 <= task["k1"] <= 1 and len(task["latents"]["5"]) == 5
        mean_k1 = sum(t["k1"] for t in doc["sparse_probing_by_task"].values()) / 2
        assert doc["probe_k1_acc"] == pytest.approx(mean_k1) == float(row["probe_k1_acc"])
        assert [r["letter"] for r in doc["absorption_by_letter"]] == letters
        assert results[name]["absorption_letters"] == doc["absorption_letters"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (
        "layers.3.resid/probe_k5_acc" in logged[0]
        and "layers.1.mlp/absorption_letters" in logged[0]
    )
    assert "| probe_k1_acc |" in (out / "suite_table.md").read_text().replace(" | ", " |\n| ")

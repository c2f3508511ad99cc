"""Review: metrics, gradient accumulation, micro-batching and evaluation of the DPO-family and
reward-model stages, each checked against an independent computation written out here
(plain full-logits forwards of one sequence at a time, float64 arithmetic, per-prompt
averages spelled out by hand).

`train.lr=1e-12` makes a step's update smaller than a float32 ulp of all but the tiniest
weights, so the weights after the step equal the weights before to ~1e-12: the step's train metrics, the evaluation
before training and the final evaluation are all taken at the starting weights, which the
test can rebuild (the `tiny` preset is a fixed seed-0 checkpoint; a reward model's random
head is read back from run_dir/final).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.config import DPOConfig, DPOLossConfig, RMConfig
from posttrain.data.preferences import PreferenceRecord, encode_preference
from posttrain.data.templates import CHATML
from posttrain.models.loading import load_model, load_tokenizer

# (prompt, responses, ranks): rankings of different sizes, one with a tie
TRAIN_ROWS = [
    ("Smallest letter: q m t", ["m", "t"], [0, 1]),
    ("Copy: a b", ["a b", "b a b a", "a"], [0, 1, 2]),
    ("Reverse: x y z w", ["w z y x", "x y z w", "w", "z z"], [0, 1, 2, 3]),
    ("Count letters: a b c", ["3", "4"], [0, 1]),
    ("Smallest letter: k d", ["d", "k", "a"], [0, 0, 1]),  # a tie: 2 ordered pairs
    ("Copy: z", ["z", "zz zz zz"], [0, 1]),
]
EVAL_ROWS = [
    ("Smallest letter: b c", ["b", "c"], [0, 1]),
    ("Copy: q r", ["q r", "r q", "q q q", "r"], [0, 1, 2, 3]),
    ("Reverse: a b", ["b a", "a b"], [0, 1]),
    ("Count letters: x y", ["2", "3", "1"], [0, 1, 2]),
    ("Smallest letter: e f g", ["e", "f"], [0, 1]),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def _write_rankings(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "responses": r, "ranks": k}) + "\n" for p, r, k in rows))
    return str(path)


def _encode(tokenizer, rows):
    """Each row → (list of (input_ids, labels) per response, ranks)."""
    out = []
    for i, (p, responses, ranks) in enumerate(rows):
        rec = PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(responses), ranks=list(ranks),
                               source=f"r:{i}")
        ex = encode_preference(rec, tokenizer, CHATML)
        out.append(([(list(s.input_ids), list(s.labels)) for s in ex.sequences], list(ranks)))
    return out


def _seq_logp(model, ids, labels):
    """(Σ log p of the labelled tokens, their count), one unpadded sequence, full logits, float64."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    total = logprobs.new_zeros(())
    count = 0
    for t in range(1, len(ids)):
        if labels[t] != -100:
            total = total + logprobs[t - 1, labels[t]]
            count += 1
    return total, count


def _ordered_pairs(ranks):
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def _logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _dpo_cfg(tmp_path, train_file, eval_file, *extra):
    return DPOConfig.load(None, [f"output_dir={tmp_path}", f"data.train_files=[{train_file}]",
                                 f"data.eval_files=[{eval_file}]", "data.template=chatml", "data.max_length=64",
                                 "train.lr=1e-12", "train.progress_bar=false", "train.resume=never",
                                 "train.max_grad_norm=0", "train.schedule=constant", *extra])


# --------------------------------------------------------------------------- SimPO: a reference-free loss whose
# rewards are not 0 at the start, through run_dpo


def _simpo_expected(model, encoded, beta, gamma):
    """Per-prompt averages (each prompt counts once, its ordered pairs 1/#pairs each) of SimPO's
    loss and of every logged metric, computed one sequence at a time in float64."""
    sums = {k: 0.0 for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy",
                             "logps/chosen", "logps/rejected")}
    loss_graph = 0.0
    for sequences, ranks in encoded:
        logps, avgs = [], []
        for ids, labels in sequences:
            total, count = _seq_logp(model, ids, labels)
            logps.append(total)
            avgs.append(total / count)
        pairs = _ordered_pairs(ranks)
        for i, j in pairs:
            w = 1.0 / len(pairs)
            rc, rr = beta * float(avgs[i].detach()), beta * float(avgs[j].detach())
            term = -torch.nn.functional.logsigmoid(beta * (avgs[i] - avgs[j]) - gamma)
            loss_graph = loss_graph + w * term
            sums["loss"] += w * float(term.detach())
            sums["rewards/chosen"] += w * rc
            sums["rewards/rejected"] += w * rr
            sums["rewards/margins"] += w * (rc - rr)
            sums["rewards/accuracy"] += w * (1.0 if rc > rr else 0.5 if rc == rr else 0.0)
            sums["logps/chosen"] += w * float(logps[i].detach())
            sums["logps/rejected"] += w * float(logps[j].detach())
    n = len(encoded)
    return {k: v / n for k, v in sums.items()}, loss_graph / n


@pytest.fixture(scope="module")
def simpo_expected(tokenizer):
    model = load_model("tiny").double().eval()
    train, evaluation = _encode(tokenizer, TRAIN_ROWS), _encode(tokenizer, EVAL_ROWS)
    expected_train, loss_graph = _simpo_expected(model, train, 2.0, 0.5)
    loss_graph.backward()
    grad_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    with torch.no_grad():
        expected_eval, _ = _simpo_expected(model, evaluation, 2.0, 0.5)
    return expected_train, grad_norm, expected_eval


@pytest.mark.parametrize("size,accum", [(6, 1), (4, 2), (1, 6)], ids=["6x1", "4+2", "1x6"])
def test_simpo_step_loss_grad_and_metrics_equal_the_whole_batch_per_prompt_average(tmp_path, simpo_expected,
                                                                                  size, accum):
    """One optimizer step over all 6 training prompts (K = 2, 3, 4, 2, 3-with-a-tie, 2), taken as one
    micro-batch, as 4 + 2 prompts, or as 6 × 1: the logged loss, grad norm and every metric are the
    per-prompt averages of the whole step, computed independently."""
    from posttrain.train.preference import run_dpo

    train_file = _write_rankings(tmp_path / "train.jsonl", TRAIN_ROWS)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS)
    run_dir = run_dpo(_dpo_cfg(tmp_path / "run", train_file, eval_file, "dpo.loss=simpo", "dpo.beta=2",
                               "dpo.simpo_gamma=0.5", "train.max_steps=1", f"train.batch_size={size}",
                               f"train.grad_accum={accum}"))
    expected, grad_norm, _ = simpo_expected
    step = [r for r in _records(run_dir) if "loss" in r]
    assert len(step) == 1
    step = step[0]
    assert step["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert step["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    for name, value in expected.items():
        if name != "loss":
            assert step[name] == pytest.approx(value, abs=1e-5), name


@pytest.mark.parametrize("size", [2, 3], ids=["eval_batch2", "eval_batch3"])
def test_simpo_eval_metrics_are_over_the_whole_eval_set_not_a_mean_of_batch_means(tmp_path, simpo_expected, size):
    """5 held-out prompts in batches of 2 (2+2+1) or 3 (3+2): eval_before (summary.json), the
    final eval record and its eval_loss are the per-prompt averages over all 5."""
    from posttrain.train.preference import run_dpo

    train_file = _write_rankings(tmp_path / "train.jsonl", TRAIN_ROWS)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS)
    run_dir = run_dpo(_dpo_cfg(tmp_path / "run", train_file, eval_file, "dpo.loss=simpo", "dpo.beta=2",
                               "dpo.simpo_gamma=0.5", "train.max_steps=1", f"train.batch_size={size}"))
    _, _, expected = simpo_expected
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_items"] == 6
    final_eval = [r for r in _records(run_dir) if "eval_loss" in r][-1]
    assert summary["eval_items"] == 5
    assert final_eval["eval_loss"] == pytest.approx(expected["loss"], abs=1e-5)
    for name, value in expected.items():
        if name == "loss":
            continue
        assert summary["eval_before"][name] == pytest.approx(value, abs=1e-5), name
        assert summary["eval_after"][name] == pytest.approx(value, abs=1e-5), name
        assert final_eval[f"eval_{name}"] == pytest.approx(value, abs=1e-5), name


# --------------------------------------------------------------------------- every pair loss with a reference,
# through the loop's own _train_step and evaluate, on hand-made reference log-probs


def _offsets(n, scale=0.37):
    """Deterministic, varied per-sequence offsets: reference = policy + offset, so rewards are not 0."""
    return [(((7 * k) % 11) - 5) * scale for k in range(n)]


def _items_with_reference(tokenizer, rows, model64):
    from posttrain.train.grouped import items_from_examples

    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(k), source=f"r:{i}")
               for i, (p, r, k) in enumerate(rows)]
    items = items_from_examples([encode_preference(rec, tokenizer, CHATML) for rec in records])
    offsets = iter(_offsets(sum(len(i.sequences) for i in items)))
    with torch.no_grad():
        for item in items:
            item.reference_logps = [float(_seq_logp(model64, s.input_ids, s.labels)[0]) + next(offsets)
                                    for s in item.sequences]
    return items


def _log_odds(avg):
    return avg - torch.log(-torch.expm1(avg))


def _pair_terms(loss, c, pc, pr, rc, rr, ac, ar, rac, rar):
    """(loss term with graph, chosen reward, rejected reward, extra metrics) for one ordered pair, by the papers
    (IPO on per-token averages, policy's and reference's: `rac`, `rar`); the NLL term (ORPO's L_SFT, RPO's) is
    the prompt's, on its best response (`_expected_pair_metrics`)."""
    fls = torch.nn.functional.logsigmoid
    h = (pc - rc) - (pr - rr)
    extra = {}
    if loss == "dpo":
        term = -fls(c.beta * h)
    elif loss == "cdpo":
        term = -(1 - c.label_smoothing) * fls(c.beta * h) - c.label_smoothing * fls(-c.beta * h)
    elif loss == "ipo":
        term = ((ac - rac) - (ar - rar) - 1 / (2 * c.beta)) ** 2
        return term, c.beta * float((ac - rac).detach()), c.beta * float((ar - rar).detach()), extra
    elif loss == "hinge":
        term = torch.relu(1 - c.beta * h)
    elif loss == "orpo":
        ratio = _log_odds(ac) - _log_odds(ar)
        term = -c.orpo_lambda * fls(ratio)
        extra = {"log_odds_ratio": float(ratio.detach())}
        return term, c.beta * float(ac.detach()), c.beta * float(ar.detach()), extra
    else:
        raise AssertionError(loss)
    return term, c.beta * float((pc - rc).detach()), c.beta * float((pr - rr).detach()), extra


def _expected_pair_metrics(model64, items, loss, c):
    """Loss (with graph) and metrics averaged over prompts, each prompt's ordered pairs 1/#pairs each."""
    sums: dict[str, float] = {}
    graph = 0.0

    def add(name, value):
        sums[name] = sums.get(name, 0.0) + value

    for item in items:
        stats = [_seq_logp(model64, s.input_ids, s.labels) for s in item.sequences]
        logps = [t for t, _ in stats]
        avgs = [t / n for t, n in stats]
        ref = item.reference_logps
        pairs = _ordered_pairs(item.ranks)
        for i, j in pairs:
            w = 1.0 / len(pairs)
            term, r_c, r_r, extra = _pair_terms(loss, c, logps[i], logps[j], ref[i], ref[j], avgs[i], avgs[j],
                                                ref[i] / stats[i][1], ref[j] / stats[j][1])
            graph = graph + w * term
            add("loss", w * float(term.detach()))
            add("rewards/chosen", w * r_c)
            add("rewards/rejected", w * r_r)
            add("rewards/margins", w * (r_c - r_r))
            add("rewards/accuracy", w * (1.0 if r_c > r_r else 0.5 if r_c == r_r else 0.0))
            add("logps/chosen", w * float(logps[i].detach()))
            add("logps/rejected", w * float(logps[j].detach()))
            for name, value in extra.items():
                add(name, w * value)
        if loss == "orpo" or c.nll_weight:  # once per prompt: the mean token NLL of its best response(s)
            best = [k for k, rank in enumerate(item.ranks) if rank == min(item.ranks)]
            nll = sum(-avgs[k] for k in best) / len(best)
            coef = 1.0 if loss == "orpo" else c.nll_weight
            graph = graph + coef * nll
            add("loss", coef * float(nll.detach()))
            add("nll", float(nll.detach()))
    return {k: v / len(items) for k, v in sums.items()}, graph / len(items)


PAIR_LOSS_CASES = {
    "dpo": DPOLossConfig(loss="dpo", beta=0.3),
    "cdpo": DPOLossConfig(loss="cdpo", beta=0.3, label_smoothing=0.2),
    "ipo": DPOLossConfig(loss="ipo", beta=0.3),
    "hinge": DPOLossConfig(loss="hinge", beta=0.3),
    "orpo": DPOLossConfig(loss="orpo", beta=0.3, orpo_lambda=0.7),
    "rpo": DPOLossConfig(loss="dpo", beta=0.3, nll_weight=0.5),
}


def _accelerator(tmp_path):
    from posttrain.config.sections import TrainConfig
    from posttrain.train.runs import make_accelerator

    return make_accelerator(TrainConfig(), tmp_path)


@pytest.mark.parametrize("name,share", [(name, False) for name in PAIR_LOSS_CASES] + [("dpo", True), ("orpo", True)],
                         ids=[f"{name}-rows" for name in PAIR_LOSS_CASES] + ["dpo-shared_prompt", "orpo-shared_prompt"])
def test_pair_losses_train_step_over_unequal_micro_batches_and_eval_equal_independent_values(tokenizer, tmp_path,
                                                                                             name, share):
    """_train_step over micro-batches of 4 and 2 prompts (13 ordered pairs of 4, 2 pairs of 2) gives
    the loss, every gradient and every metric of the whole batch's per-prompt average; evaluate over
    5 held-out prompts in batches 2+2+1 gives the whole held-out set's per-prompt average."""
    from posttrain.config.sections import TrainConfig
    from posttrain.train.grouped import GroupedStage
    from posttrain.train.loop import _train_step, evaluate
    from posttrain.train.preference import PreferenceLoss, pair_extras

    c = PAIR_LOSS_CASES[name]
    model = load_model("tiny")
    model64 = load_model("tiny").double()
    train_items = _items_with_reference(tokenizer, TRAIN_ROWS, model64)
    eval_items = _items_with_reference(tokenizer, EVAL_ROWS, model64)
    cfg = TrainConfig(batch_size=2, max_grad_norm=0.0)
    module = PreferenceLoss(model, c)
    stage = GroupedStage(module, train_items, eval_items, cfg, tokenizer.pad_token_id, pair_extras, share_prompt=share)
    accelerator = _accelerator(tmp_path)
    micro = [stage.collate(train_items[:4]), stage.collate(train_items[4:])]
    loss, grad_norm, metrics = _train_step(module, stage, micro, accelerator, cfg)
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}

    expected, graph = _expected_pair_metrics(model64, train_items, name if name != "rpo" else "dpo", c)
    graph.backward()
    expected_grads = {n: p.grad for n, p in model64.named_parameters() if p.grad is not None}
    assert loss == pytest.approx(expected["loss"], abs=1e-5)
    assert set(metrics) == set(expected) - {"loss"}
    for key, value in expected.items():
        if key != "loss":
            assert metrics[key] == pytest.approx(value, abs=1e-4), key
    assert set(grads) == set(expected_grads)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in expected_grads.values()))
    assert grad_norm == pytest.approx(norm, rel=1e-3)
    for n, g in expected_grads.items():
        assert torch.allclose(grads[n].to_dense() if grads[n].is_sparse else grads[n], g, rtol=1e-3,
                              atol=1e-6 * max(1.0, norm)), n

    model.zero_grad(set_to_none=True)
    eval_loss, eval_metrics = evaluate(module, stage, accelerator)
    with torch.no_grad():
        expected_eval, _ = _expected_pair_metrics(model64, eval_items, name if name != "rpo" else "dpo", c)
    assert eval_loss == pytest.approx(expected_eval["loss"], abs=1e-5)
    for key, value in expected_eval.items():
        if key != "loss":
            assert eval_metrics[key] == pytest.approx(value, abs=1e-4), key


# --------------------------------------------------------------------------- KTO


KTO_CFG = DPOLossConfig(loss="kto", beta=0.5, kto_desirable_weight=1.5, kto_undesirable_weight=0.7)


# KTO takes a ranking's ends (best desirable, worst not): one more ranking, tied worst, makes 16 items
KTO_ROWS = TRAIN_ROWS + [("Count letters: p", ["1", "2", "3"], [0, 1, 1])]


def _kto_setup(tokenizer, rows, model64):
    """KTO items (each ranking split into its desirable best and undesirable worst, each with a
    mismatched partner) with reference = policy + offset; the mismatched rows' offsets make the
    log-ratio 1.55 on average over the first 8 items and -1 over the last 8, so z0 = 0.275 > 0 over
    all 16, but a batch of the last items alone would clamp its estimate at 0."""
    from posttrain.train.grouped import items_from_examples
    from posttrain.train.preference import kto_items

    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(k), source=f"r:{i}")
               for i, (p, r, k) in enumerate(rows)]
    items = kto_items(items_from_examples([encode_preference(rec, tokenizer, CHATML) for rec in records]), 64,
                      lambda *_: None)
    with torch.no_grad():
        for k, item in enumerate(items):
            own, other = (float(_seq_logp(model64, s.input_ids, s.labels)[0]) for s in item.sequences)
            shift = -(0.2 + 0.9 * (k % 4)) if k < 8 else 1.0  # first 8: log-ratio 1.55 on average; last 8: -1
            item.reference_logps = [own + _offsets(len(items))[k], other + shift]
    return items


def _kto_expected(model64, items, c, with_graph=True):
    """Whole-batch KTO: z0 = max(0, mean over ALL the batch's mismatched rows of log π − log π_ref)."""
    kl_terms, values = [], []
    for item in items:
        logp, _ = _seq_logp(model64, item.sequences[0].input_ids, item.sequences[0].labels)
        with torch.no_grad():
            other, _ = _seq_logp(model64, item.sequences[1].input_ids, item.sequences[1].labels)
        kl_terms.append(float(other) - item.reference_logps[1])
        values.append((logp, logp - item.reference_logps[0], bool(item.desirable)))
    z0 = max(0.0, sum(kl_terms) / len(kl_terms))
    graph, loss, signed, logps = 0.0, 0.0, 0.0, 0.0
    for logp, r, desirable in values:
        if desirable:
            term = c.kto_desirable_weight * (1 - torch.sigmoid(c.beta * (r - z0)))
        else:
            term = c.kto_undesirable_weight * (1 - torch.sigmoid(c.beta * (z0 - r)))
        graph = graph + term
        loss += float(term.detach())
        signed += c.beta * float(r.detach()) * (1 if desirable else -1)
        logps += float(logp.detach())
    n = len(items)
    return {"loss": loss / n, "kl": z0, "rewards/signed": signed / n, "logps": logps / n}, graph / n


def _kto_step(tokenizer, tmp_path, sizes):
    from posttrain.config.sections import TrainConfig
    from posttrain.train.grouped import GroupedStage
    from posttrain.train.loop import _train_step
    from posttrain.train.preference import PreferenceLoss, kto_extras

    model, model64 = load_model("tiny"), load_model("tiny").double()
    items = _kto_setup(tokenizer, KTO_ROWS, model64)
    cfg = TrainConfig(batch_size=max(sizes), max_grad_norm=0.0)
    module = PreferenceLoss(model, KTO_CFG)
    stage = GroupedStage(module, items, [], cfg, tokenizer.pad_token_id, kto_extras)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    assert bounds[-1] == len(items)
    micro = [stage.collate(items[a:b]) for a, b in zip(bounds, bounds[1:])]
    loss, grad_norm, metrics = _train_step(module, stage, micro, _accelerator(tmp_path), cfg)
    expected, graph = _kto_expected(model64, items, KTO_CFG)
    graph.backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model64.parameters() if p.grad is not None))
    return (loss, grad_norm, metrics), (expected, norm), items


def test_kto_one_micro_batch_equals_the_independent_whole_batch_values(tokenizer, tmp_path):
    """16 KTO items (8 desirable, 8 undesirable, λ_D 1.5, λ_U 0.7) in one micro-batch: loss, grad
    norm, kl (z0), rewards/signed and logps equal the formulas of Ethayarajh et al. by hand."""
    (loss, grad_norm, metrics), (expected, norm), items = _kto_step(tokenizer, tmp_path, [16])
    assert sum(bool(i.desirable) for i in items) == 8 and len(items) == 16  # ties: two best, two worst
    assert expected["kl"] == pytest.approx(0.275, abs=1e-9)
    assert loss == pytest.approx(expected["loss"], abs=1e-5)
    assert grad_norm == pytest.approx(norm, rel=1e-3)
    for key in ("kl", "rewards/signed", "logps"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-4), key


def test_kto_accumulated_step_equals_the_whole_batch(tokenizer, tmp_path):
    """The same 16 items as micro-batches of 10 and 6: the loop promises the step of the whole batch
    (loop.py docstring; README: batch 8 × accumulation 1 == batch 1 × accumulation 8)."""
    (loss, grad_norm, metrics), (expected, norm), _ = _kto_step(tokenizer, tmp_path, [10, 6])
    assert loss == pytest.approx(expected["loss"], abs=1e-5)
    assert metrics["kl"] == pytest.approx(expected["kl"], abs=1e-4)
    assert grad_norm == pytest.approx(norm, rel=1e-3)


# --------------------------------------------------------------------------- reward model, through run_rm


def _rm_cfg(tmp_path, train_files, eval_file, *extra):
    files = ",".join(train_files)
    return RMConfig.load(None, [f"output_dir={tmp_path}", f"data.train_files=[{files}]", f"data.eval_files=[{eval_file}]",
                                "data.template=chatml", "data.max_length=64", "train.lr=1e-12",
                                "train.progress_bar=false", "train.resume=never", "train.max_grad_norm=0",
                                "train.schedule=constant", *extra])


def _rewards(model64, encoded):
    """Each response's reward, scored alone (the head at its last token), float64."""
    with torch.no_grad():
        return [[float(model64(input_ids=torch.tensor([ids])).logits[0, 0]) for ids, _ in seqs] for seqs, _ in encoded]


def _rm_expected(rewards, encoded, centering=0.0, margins=None):
    """InstructGPT loss (Bradley-Terry with margin for pairs) and the metrics, per prompt then averaged;
    plus the population std over every response (each prompt's responses weighted 1/K, as the
    per-prompt averaging does)."""
    out = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "reward_mean": 0.0}
    weighted = []
    for p, ((_, ranks), r) in enumerate(zip(encoded, rewards)):
        pairs = _ordered_pairs(ranks)
        m = margins[p] if margins else 0.0
        out["loss"] += sum(-_logsigmoid(r[i] - r[j] - m) for i, j in pairs) / len(pairs)
        out["loss"] += centering * (2 * sum(r) / len(r)) ** 2
        out["accuracy"] += sum(1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0 for i, j in pairs) / len(pairs)
        out["margin"] += sum(r[i] - r[j] for i, j in pairs) / len(pairs)
        out["reward_mean"] += sum(r) / len(r)
        weighted += [(x, 1.0 / len(r)) for x in r]
    n = len(encoded)
    out = {k: v / n for k, v in out.items()}
    total = sum(w for _, w in weighted)
    mean = sum(x * w for x, w in weighted) / total
    out["reward_std"] = math.sqrt(sum(w * (x - mean) ** 2 for x, w in weighted) / total)
    return out


@pytest.mark.parametrize("size,accum", [(6, 1), (4, 2), (1, 6)], ids=["6x1", "4+2", "1x6"])
def test_reward_model_step_and_eval_metrics_equal_independent_values(tmp_path, tokenizer, size, accum):
    """Rankings of 2, 3, 4 responses (one with a tie), centering 0.05: the one step's loss and
    metrics (whatever the split into micro-batches), and the held-out metrics before and after
    (5 prompts, batches that do not divide them), equal the per-prompt averages scored one
    response at a time."""
    from posttrain.models.reward_model import load_reward_model
    from posttrain.train.reward import run_rm

    train_file = _write_rankings(tmp_path / "train.jsonl", TRAIN_ROWS)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS)
    run_dir = run_rm(_rm_cfg(tmp_path / "run", [train_file], eval_file, "train.max_steps=1", "reward.centering=0.05",
                             f"train.batch_size={size}", f"train.grad_accum={accum}"))
    model64 = load_reward_model(str(run_dir / "final")).double().eval()
    train, evaluation = _encode(tokenizer, TRAIN_ROWS), _encode(tokenizer, EVAL_ROWS)
    expected = _rm_expected(_rewards(model64, train), train, centering=0.05)
    expected_eval = _rm_expected(_rewards(model64, evaluation), evaluation, centering=0.05)
    records = _records(run_dir)
    step = [r for r in records if "loss" in r]
    assert len(step) == 1
    for key, value in expected.items():
        assert step[0][key] == pytest.approx(value, abs=1e-5), key
    summary = json.loads((run_dir / "summary.json").read_text())
    final_eval = [r for r in records if "eval_loss" in r][-1]
    assert final_eval["eval_loss"] == pytest.approx(expected_eval["loss"], abs=1e-5)
    assert set(summary["eval_before"]) == set(summary["eval_after"]) == set(expected_eval) - {"loss"}
    for key, value in expected_eval.items():
        if key != "loss":
            assert summary["eval_before"][key] == pytest.approx(value, abs=1e-5), key
            assert summary["eval_after"][key] == pytest.approx(value, abs=1e-5), key
            assert final_eval[f"eval_{key}"] == pytest.approx(value, abs=1e-5), key


EQUAL_K_EVAL = [("Smallest letter: b c", ["b", "c", "d"], [0, 1, 2]),
                ("Copy: q r", ["q r", "r q", "q"], [0, 1, 2]),
                ("Reverse: a b", ["b a", "a b", "b"], [0, 1, 2]),
                ("Count letters: x y", ["2", "3", "1"], [0, 1, 2]),
                ("Smallest letter: e f g", ["e", "f", "g"], [0, 1, 2])]


def test_reward_std_is_the_std_over_every_held_out_reward_not_a_mean_of_batch_stds(tmp_path, tokenizer):
    """5 prompts × 3 responses, eval batches 2+2+1: reward_std equals the population std of all
    15 held-out rewards (numpy-free, by hand), and reward_mean their mean."""
    from posttrain.models.reward_model import load_reward_model
    from posttrain.train.reward import run_rm

    train_file = _write_rankings(tmp_path / "train.jsonl", TRAIN_ROWS)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EQUAL_K_EVAL)
    run_dir = run_rm(_rm_cfg(tmp_path / "run", [train_file], eval_file, "train.max_steps=1", "train.batch_size=2"))
    model64 = load_reward_model(str(run_dir / "final")).double().eval()
    flat = [x for row in _rewards(model64, _encode(tokenizer, EQUAL_K_EVAL)) for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat))
    assert std > 1e-3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_after"]["reward_mean"] == pytest.approx(mean, abs=1e-6)
    assert summary["eval_after"]["reward_std"] == pytest.approx(std, rel=1e-4)


PAIR_ROWS = [("Smallest letter: q m t", "m", "t", 0.5), ("Copy: a b", "a b", "b a b a", 2.0),
             ("Reverse: x y z w", "w z y x", "x y z w", 0.0), ("Count letters: a b c", "3", "4", 1.0)]


def _write_pairs(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r, "margin": m}) + "\n"
                            for p, c, r, m in rows))
    return str(path)


def test_reward_model_pair_margins_over_unequal_micro_batches(tmp_path, tokenizer):
    """Pairs with Llama-2 margins, one step as micro-batches of 3 + 1: −log σ(r_w − r_l − m) averaged
    over the 4 pairs, computed one response at a time."""
    from posttrain.models.reward_model import load_reward_model
    from posttrain.train.reward import run_rm

    train_file = _write_pairs(tmp_path / "train.jsonl", PAIR_ROWS)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS[:1])
    run_dir = run_rm(_rm_cfg(tmp_path / "run", [train_file], eval_file, "train.max_steps=1", "train.batch_size=3",
                             "train.grad_accum=2"))
    model64 = load_reward_model(str(run_dir / "final")).double().eval()
    encoded = _encode(tokenizer, [(p, [c, r], [0, 1]) for p, c, r, _ in PAIR_ROWS])
    expected = _rm_expected(_rewards(model64, encoded), encoded, margins=[m for *_, m in PAIR_ROWS])
    step = [r for r in _records(run_dir) if "loss" in r]
    assert len(step) == 1
    for key, value in expected.items():
        assert step[0][key] == pytest.approx(value, abs=1e-5), key


# --------------------------------------------------------------------------- the update itself, epochs, metrics.jsonl


@pytest.mark.parametrize("size,accum", [(4, 2), (1, 6)], ids=["4+2", "1x6"])
def test_simpo_accumulated_update_equals_adamw_first_step_on_the_whole_batch_gradient(tmp_path, simpo_expected,
                                                                                     tokenizer, size, accum):
    """The weights after one step equal AdamW's first step computed by hand from the whole batch's
    gradient (bias-corrected: w − lr·g/(|g| + eps)), whatever the micro-batching. eps = 1e-3 keeps
    the step a smooth function of g, so float32 rounding in g stays far below the tolerance."""
    from posttrain.train.preference import run_dpo

    lr, eps = 1e-3, 1e-3
    train_file = _write_rankings(tmp_path / "train.jsonl", TRAIN_ROWS)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS[:1])
    run_dir = run_dpo(_dpo_cfg(tmp_path / "run", train_file, eval_file, "dpo.loss=simpo", "dpo.beta=2",
                               "dpo.simpo_gamma=0.5", "train.max_steps=1", f"train.batch_size={size}",
                               f"train.grad_accum={accum}", f"train.lr={lr}", f"train.adam_eps={eps}"))
    model64 = load_model("tiny").double()
    _, graph = _simpo_expected(model64, _encode(tokenizer, TRAIN_ROWS), 2.0, 0.5)
    graph.backward()
    after = dict(load_model(str(run_dir / "final")).named_parameters())
    moved = 0
    for name, p in model64.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        expected = p.detach() - lr * g / (g.abs() + eps)
        assert torch.allclose(after[name].double(), expected, atol=2e-6, rtol=0), name
        moved += int((after[name].double() != p.detach().float().double()).sum())
    assert moved > 1000


def test_the_last_partial_step_of_an_epoch_is_topped_up_and_weighted_by_its_items(tmp_path, tokenizer):
    """5 prompts, batch 2 × accumulation 2, one epoch = 2 steps: the first takes 4 prompts, the last
    the 5th (a micro-batch of 1) topped up with the epoch's first micro-batch (2 prompts already seen),
    as loop._steps documents; each step's loss is the plain mean over its prompts. Checked against
    per-prompt SimPO losses by hand, for whichever order the shuffle chose."""
    import itertools

    from posttrain.train.preference import run_dpo

    rows = TRAIN_ROWS[:5]
    train_file = _write_rankings(tmp_path / "train.jsonl", rows)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS[:1])
    run_dir = run_dpo(_dpo_cfg(tmp_path / "run", train_file, eval_file, "dpo.loss=simpo", "dpo.beta=2",
                               "dpo.simpo_gamma=0.5", "train.max_steps=0", "train.epochs=1", "train.batch_size=2",
                               "train.grad_accum=2"))
    steps = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["epoch"] for r in steps] == [0.6667, 1.0]  # epochs read: the topped-up step closes epoch 0
    model64 = load_model("tiny").double()
    with torch.no_grad():
        per = [_simpo_expected(model64, [e], 2.0, 0.5)[0] for e in _encode(tokenizer, rows)]
    matches = []
    for z in range(5):
        rest = [i for i in range(5) if i != z]
        first = {k: sum(per[i][k] for i in rest) / 4 for k in per[0]}
        for a, b in itertools.combinations(rest, 2):
            second = {k: (per[z][k] + per[a][k] + per[b][k]) / 3 for k in per[0]}
            if all(abs(steps[0][k] - first[k]) < 1e-5 and abs(steps[1][k] - second[k]) < 1e-5 for k in per[0]):
                matches.append((z, a, b))
    assert matches, [(r["loss"], r["rewards/chosen"]) for r in steps]


def test_metrics_jsonl_holds_every_step_and_every_evaluation_with_the_true_values(tmp_path, simpo_expected):
    """eval_every=1 over 2 steps: metrics.jsonl holds train records for steps 1 and 2 and eval records
    for both, each eval record with eval_loss and eval_<metric> for every metric the train records
    carry; the values (weights unchanged at lr 1e-12) are the independent ones; summary.json's
    eval_after is the last eval record."""
    from posttrain.train.preference import run_dpo

    train_file = _write_rankings(tmp_path / "train.jsonl", TRAIN_ROWS)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS)
    run_dir = run_dpo(_dpo_cfg(tmp_path / "run", train_file, eval_file, "dpo.loss=simpo", "dpo.beta=2",
                               "dpo.simpo_gamma=0.5", "train.max_steps=2", "train.batch_size=3",
                               "train.grad_accum=2", "train.eval_every=1"))
    expected_train, _, expected_eval = simpo_expected
    records = _records(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [1, 2]
    metric_names = set(expected_train) - {"loss"}
    for r in train:
        assert metric_names <= set(r)
        assert {"lr", "grad_norm", "tokens", "epoch", "skipped_steps"} <= set(r)
        for key, value in expected_train.items():
            assert r[key] == pytest.approx(value, abs=1e-5), key
    for r in evals:
        assert set(r) == {"step", "eval_loss"} | {f"eval_{k}" for k in metric_names}
        assert r["eval_loss"] == pytest.approx(expected_eval["loss"], abs=1e-5)
        for key in metric_names:
            assert r[f"eval_{key}"] == pytest.approx(expected_eval[key], abs=1e-5), key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["eval_after"] == {k[len("eval_"):]: v for k, v in evals[-1].items() if k.startswith("eval_")
                                     and k != "eval_loss"}
    # tokens: all real tokens of the step's 6 prompts (each prompt once per response, or once when shared)
    assert all(r["tokens"] > 0 for r in train)


def test_kto_eval_loss_and_kl_are_those_of_the_whole_held_out_set(tokenizer, tmp_path):
    """evaluate over 16 KTO items in batches of 8: the held-out z0 of the whole set is 0.275; the first
    batch alone estimates 1.55 and the second -1 (clamped to 0)."""
    from posttrain.config.sections import TrainConfig
    from posttrain.train.grouped import GroupedStage
    from posttrain.train.loop import evaluate
    from posttrain.train.preference import PreferenceLoss, kto_extras

    model, model64 = load_model("tiny"), load_model("tiny").double()
    items = _kto_setup(tokenizer, KTO_ROWS, model64)
    cfg = TrainConfig(batch_size=8)
    module = PreferenceLoss(model, KTO_CFG)
    stage = GroupedStage(module, items[:1], items, cfg, tokenizer.pad_token_id, kto_extras)
    loss, metrics = evaluate(module, stage, _accelerator(tmp_path))
    with torch.no_grad():
        expected, _ = _kto_expected(model64, items, KTO_CFG)
    assert metrics["kl"] == pytest.approx(expected["kl"], abs=1e-4)
    assert loss == pytest.approx(expected["loss"], abs=1e-5)


def _mixed_margin_run(tmp_path, tokenizer, size, accum):
    from posttrain.models.reward_model import load_reward_model
    from posttrain.train.reward import run_rm

    pairs_file = _write_pairs(tmp_path / "pairs.jsonl", PAIR_ROWS)
    rankings_file = _write_rankings(tmp_path / "rankings.jsonl", TRAIN_ROWS[1:3])
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS[:1])
    run_dir = run_rm(_rm_cfg(tmp_path / "run", [pairs_file, rankings_file], eval_file, "train.max_steps=1",
                             f"train.batch_size={size}", f"train.grad_accum={accum}"))
    model64 = load_reward_model(str(run_dir / "final")).double().eval()
    rows = [(p, [c, r], [0, 1]) for p, c, r, _ in PAIR_ROWS] + TRAIN_ROWS[1:3]
    encoded = _encode(tokenizer, rows)
    expected = _rm_expected(_rewards(model64, encoded), encoded, margins=[m for *_, m in PAIR_ROWS] + [0.0, 0.0])
    step = [r for r in _records(run_dir) if "loss" in r]
    return step[0]["loss"], expected["loss"]


def test_reward_model_pairs_keep_their_margins_when_each_micro_batch_holds_one_prompt(tmp_path, tokenizer):
    """4 margin pairs + 2 rankings, batch 1 × accumulation 6: every pair goes through Bradley-Terry
    with its margin."""
    loss, expected = _mixed_margin_run(tmp_path, tokenizer, 1, 6)
    assert loss == pytest.approx(expected, abs=1e-5)


def test_reward_model_pairs_keep_their_margins_in_a_micro_batch_that_also_holds_rankings(tmp_path, tokenizer):
    """The same 6 prompts as ONE micro-batch (batch 6 × accumulation 1): the loop promises the same
    step as batch 1 × accumulation 6, i.e. each pair's margin still applies."""
    loss, expected = _mixed_margin_run(tmp_path, tokenizer, 6, 1)
    assert loss == pytest.approx(expected, abs=1e-5)


def test_an_epoch_shorter_than_one_global_step_trains_or_refuses_clearly(tmp_path, tokenizer):
    """3 prompts, batch 1 × accumulation 8: the loop's top-up ("every step is full") needs 5 more
    micro-batches than the epoch has. Acceptable: a ConfigError saying so, or one step whose loss is
    a mean of the 3 prompts' SimPO losses with each prompt counted at least once and 8 in all."""
    from posttrain.errors import ConfigError
    from posttrain.train.preference import run_dpo

    rows = TRAIN_ROWS[:3]
    train_file = _write_rankings(tmp_path / "train.jsonl", rows)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS[:1])
    try:
        run_dir = run_dpo(_dpo_cfg(tmp_path / "run", train_file, eval_file, "dpo.loss=simpo", "dpo.beta=2",
                                   "dpo.simpo_gamma=0.5", "train.max_steps=1", "train.batch_size=1",
                                   "train.grad_accum=8"))
    except ConfigError:
        return
    model64 = load_model("tiny").double()
    with torch.no_grad():
        per = [_simpo_expected(model64, [e], 2.0, 0.5)[0]["loss"] for e in _encode(tokenizer, rows)]
    loss = [r for r in _records(run_dir) if "loss" in r][0]["loss"]
    counts = [(a, b, 8 - a - b) for a in range(1, 7) for b in range(1, 8 - a)]
    assert any(abs(loss - sum(c * x for c, x in zip(cs, per)) / 8) < 1e-5 for cs in counts)


@pytest.mark.parametrize("size,accum", [(4, 2)], ids=["4+2"])
def test_dpo_with_precomputed_reference_second_step_and_eval_equal_independent_values(tmp_path, tokenizer,
                                                                                      size, accum):
    """DPO (β 0.5) with the precomputed reference, 2 steps over all 6 prompts each: step 2's metrics
    (rewards no longer 0) and the step-1 evaluation of the 5 held-out prompts equal the per-prompt
    averages at the weights of AdamW's first step, computed by hand, with the reference = the start."""
    from posttrain.train.preference import run_dpo

    lr, eps, beta = 1e-3, 1e-3, 0.5
    train_file = _write_rankings(tmp_path / "train.jsonl", TRAIN_ROWS)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS)
    run_dir = run_dpo(_dpo_cfg(tmp_path / "run", train_file, eval_file, "dpo.loss=dpo", f"dpo.beta={beta}",
                               "train.max_steps=2", f"train.batch_size={size}", f"train.grad_accum={accum}",
                               f"train.lr={lr}", f"train.adam_eps={eps}", "train.eval_every=1"))
    start = load_model("tiny").double()
    c = DPOLossConfig(loss="dpo", beta=beta)
    train_items = _items_with_reference(tokenizer, TRAIN_ROWS, start)
    eval_items = _items_with_reference(tokenizer, EVAL_ROWS, start)
    for item in train_items + eval_items:  # the reference is the starting model itself: no offset
        with torch.no_grad():
            item.reference_logps = [float(_seq_logp(start, s.input_ids, s.labels)[0]) for s in item.sequences]
    first, graph = _expected_pair_metrics(start, train_items, "dpo", c)
    graph.backward()
    with torch.no_grad():
        for p in start.parameters():
            if p.grad is not None:
                p -= lr * p.grad / (p.grad.abs() + eps)
                p.grad = None
        second, _ = _expected_pair_metrics(start, train_items, "dpo", c)
        held_out, _ = _expected_pair_metrics(start, eval_items, "dpo", c)
    records = _records(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert first["loss"] == pytest.approx(math.log(2)) and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(second["rewards/margins"]) > 1e-3  # the check has teeth: rewards moved
    for key, value in second.items():
        assert steps[1][key] == pytest.approx(value, abs=2e-4), key
    assert evals[0]["step"] == 1 and evals[0]["eval_loss"] == pytest.approx(held_out["loss"], abs=2e-4)
    for key, value in held_out.items():
        if key != "loss":
            assert evals[0][f"eval_{key}"] == pytest.approx(value, abs=2e-4), key


@pytest.mark.parametrize("extra", [
    [],
    ["model.padding_free=false"],
    ["dpo.share_prompt=false"],
], ids=["default", "padded", "rows"])
def test_dpo_accuracy_at_the_start_is_exactly_one_half(tmp_path, extra):
    """README: "DPO's implicit-reward accuracy starts at exactly 50% because the policy equals its
    reference" (every margin is 0 and a tie counts one half). Batch 1, 6 training and 5 held-out
    prompts: the step-1 and held-out (before training) accuracy is exactly 0.5 and every margin
    exactly 0."""
    from posttrain.train.preference import run_dpo

    train_file = _write_rankings(tmp_path / "train.jsonl", TRAIN_ROWS)
    eval_file = _write_rankings(tmp_path / "eval.jsonl", EVAL_ROWS)
    run_dir = run_dpo(_dpo_cfg(tmp_path / "run", train_file, eval_file, "dpo.loss=dpo", "train.max_steps=1",
                               "train.batch_size=1", *extra))
    summary = json.loads((run_dir / "summary.json").read_text())
    step = [r for r in _records(run_dir) if "loss" in r][0]
    for where in (summary["eval_before"], step):  # eval_after: lr 1e-12 still moves weights near 0 by ~1e-12
        assert where["rewards/margins"] == 0.0
        assert where["rewards/accuracy"] == pytest.approx(0.5, abs=1e-6)

"""Review of reward combination and the less-travelled reward-model paths, against independent
float64 computations (formulas written out here, plain transformers forwards, the tokenizer's
own functions).

Covered: `CombinedReward` (weights, calibration, floors, rows-taking functions), how RL builds
and post-processes the combined reward (penalty → normalise → clip, the logged figures), the
reward-model losses as pure functions (Bradley-Terry margin sign, centering, the K-way ranking
loss with ties and margins), `RewardModelLoss` routing, the held-out metrics on hand-made
scores, and a BERT-like encoder reward model trained through `run_rm`.

Tests marked xfail(strict=True) expose a defect named in their reason.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import string

import pytest
import torch

from posttrain.errors import UserError

ME = "tests.test_reward_combination_edges"  # for function specs (the repository root is on sys.path)
TURNS = [{"role": "user", "content": "Smallest letter: q m t"}]


# --------------------------------------------------------------------------- reward functions by spec


def length_fn(prompt, response):
    return float(len(response))


def answer_in_fn(prompt, response, row):
    """A verifier taking the row: 2 when the answer occurs in the response, -1 otherwise."""
    return 2.0 if str(row["answer"]) in response else -1.0


def none_fn(prompt, response):
    return None  # a common slip: a function that forgot its return on one path


def list_fn(prompt, response):
    return [float(len(response))]


def vowels_batch(prompts, responses):
    return [float(sum(ch in "aeiou" for ch in r)) for r in responses]


def turns_batch(prompts, responses, rows=None):
    """A batch reward that takes rows: the number of prompt turns times the row's 'bonus'."""
    return [len(p) * float(row.get("bonus", 0.0)) for p, row in zip(prompts, rows)]


# --------------------------------------------------------------------------- combination: the formula


def test_combined_total_equals_the_formula_in_float64():
    """total = Σ w_i (r_i − shift_i)/scale_i − penalty Σ max(0, floor_i − r_i)/scale_i, with shift/scale
    the mean / sample std of each component on a *calibration* sample (not the scored rows),
    floors read on the raw reward, a negative and a zero weight, a row-taking function spec and a
    row-taking batch reward. Raw components come back unchanged."""
    from posttrain.rewards import CombinedReward, RewardComponent, function_reward

    components = [
        RewardComponent("len", function_reward(f"{ME}:length_fn"), weight=0.3, floor=3.0),
        RewardComponent("ans", function_reward(f"{ME}:answer_in_fn"), weight=-1.7),
        RewardComponent("vow", vowels_batch, weight=0.0, floor=1.0),
        RewardComponent("turns", turns_batch, weight=2.5),
    ]
    combined = CombinedReward(components, penalty=3.25)
    calib_prompts = [TURNS, TURNS + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], TURNS,
                     TURNS]
    calib_responses = ["m", "aeiou xyz", "mq", "hello m"]
    calib_rows = [{"answer": "m", "bonus": 1.0}, {"answer": "m", "bonus": 0.5}, {"answer": "q", "bonus": 2.0},
                  {"answer": "z", "bonus": -1.0}]
    stats = combined.calibrate(calib_prompts, calib_responses, calib_rows)

    def raw_of(prompts, responses, rows):
        return {
            "len": [float(len(r)) for r in responses],
            "ans": [2.0 if row["answer"] in r else -1.0 for r, row in zip(responses, rows)],
            "vow": [float(sum(ch in "aeiou" for ch in r)) for r in responses],
            "turns": [len(p) * row.get("bonus", 0.0) for p, row in zip(prompts, rows)],
        }

    calib = raw_of(calib_prompts, calib_responses, calib_rows)
    shift = {k: statistics.fmean(v) for k, v in calib.items()}
    scale = {k: (statistics.stdev(v) or 1.0) for k, v in calib.items()}
    assert {k: pytest.approx(v, rel=1e-12) for k, v in stats.items()} == {k: (shift[k], scale[k]) for k in calib}

    prompts = [TURNS, TURNS, TURNS + TURNS, TURNS]
    responses = ["m", "a long answer", "zz", ""]
    rows = [{"answer": "m", "bonus": 1.0}, {"answer": "t", "bonus": 0.0}, {"answer": "z", "bonus": 3.0},
            {"answer": "q"}]
    totals, raw = combined.score(prompts, responses, rows)
    expected_raw = raw_of(prompts, responses, rows)
    weights = {"len": 0.3, "ans": -1.7, "vow": 0.0, "turns": 2.5}
    floors = {"len": 3.0, "vow": 1.0}
    expected = []
    for i in range(len(responses)):
        t = sum(weights[k] * (expected_raw[k][i] - shift[k]) / scale[k] for k in weights)
        t -= 3.25 * sum(max(0.0, f - expected_raw[k][i]) / scale[k] for k, f in floors.items())
        expected.append(t)
    assert raw == expected_raw
    assert totals == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("fn", ["none_fn", "list_fn"])
def test_a_function_returning_a_non_number_is_named(fn):
    """README: 'A component that returns a non-finite value, or not one value per response, stops
    the scoring with its name'. A batch reward returning junk gets that (`_checked`); a function
    spec returning None or a list must too."""
    from posttrain.rewards import CombinedReward, RewardComponent, function_reward

    combined = CombinedReward([RewardComponent("mine", function_reward(f"{ME}:{fn}"))])
    with pytest.raises(UserError, match="mine"):
        combined.score([TURNS], ["a"])


# --------------------------------------------------------------------------- combination inside RL


class _FakeEngine:
    generation_config = None
    is_policy = True

    def __init__(self, outs):
        self.outs = outs

    def generate(self, prompt_ids, settings, *, eos_token_ids, pad_token_id, stop_check=None):
        assert len(prompt_ids) == len(self.outs)
        return [list(o) for o in self.outs]


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny-2l")


def test_rollout_rewards_are_the_combined_total_then_penalty_normalise_clip(tokenizer):
    """RL's rewards from the build_reward mix (a verifier, a format regex, weights): total, minus
    reward.no_eos_penalty on completions that never end, z-normalised over the rollout (sample
    std, +1e-6), then clipped — in that order (README) — and rollout/reward_mean and reward_std
    are those of the penalised rewards (before normalising and clipping), flat_groups of the final."""
    from posttrain.config import GRPOConfig
    from posttrain.data.prompts import PromptRecord
    from posttrain.train.rollouts import build_reward, sample_and_score

    eos = tokenizer.eos_token_id
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    texts = ["m", "q", "mm", "t", "b", "xy z"]
    ended = [True, False, True, True, True, False]
    outs = [enc(t) + ([eos] if e else []) for t, e in zip(texts, ended)]
    cfg = GRPOConfig.load(None, [
        "rollout.num_generations=3", "rollout.max_new_tokens=8",
        "reward.functions=[em=posttrain.rewards:exact_match,len=" + ME + ":length_fn]",
        "reward.format_regex='[a-z]'", "reward.weights=[format=0.5,len=-0.25]", "reward.no_eos_penalty=0.75",
        "reward.normalize=true", "reward.clip=1.2"])
    records = [PromptRecord([{"role": "user", "content": "Smallest letter: q m t"}], "m", source="r:0"),
               PromptRecord([{"role": "user", "content": "Smallest letter: b t"}], "b", source="r:1")]
    rollout = sample_and_score(_FakeEngine(outs), tokenizer, [[1, 5], [1, 6]], records, [0, 1], cfg,
                               build_reward(cfg), seed=0)
    assert rollout.texts == texts
    answers = ["m"] * 3 + ["b"] * 3
    total = [float(t == a) + 0.5 * float(re.fullmatch("[a-z]", t) is not None) - 0.25 * len(t)
             for t, a in zip(texts, answers)]
    penalised = [x - 0.75 * (not e) for x, e in zip(total, ended)]
    mean, std = statistics.fmean(penalised), statistics.stdev(penalised)
    expected = [min(1.2, max(-1.2, (x - mean) / (std + 1e-6))) for x in penalised]
    assert rollout.rewards.tolist() == pytest.approx(expected, abs=1e-6)
    assert any(abs(x) == 1.2 for x in expected)  # the clip acted
    stats = rollout.stats
    assert stats.reward_mean == pytest.approx(mean, abs=1e-6)
    assert stats.reward_std == pytest.approx(std, abs=1e-6)
    assert stats.flat_groups == 0.0


@pytest.mark.parametrize("override", ["reward.weights=[exact_match=nan]", "reward.weights=[exact_match=inf]",
                                      "reward.weights=[exact_match=abc]", "reward.clip=-1"])
def test_rl_reward_settings_are_checked_like_posttrain_score(override):
    from posttrain.config import GRPOConfig, validate_grpo
    from posttrain.train.rollouts import build_reward

    cfg = GRPOConfig.load(None, [override])
    with pytest.raises(UserError):
        validate_grpo(cfg)
        build_reward(cfg)


def test_posttrain_score_refuses_non_finite_weights_and_floors():
    """The reference behaviour the RL test above compares with (a NaN reward.no_eos_penalty is
    refused by the config loader already)."""
    from posttrain.config import GRPOConfig

    with pytest.raises(UserError, match="no_eos_penalty"):
        GRPOConfig.load(None, ["reward.no_eos_penalty=nan"])
    from posttrain.rewards import build_combined

    for weights, floors in ((["len=nan"], []), (["len=inf"], []), ([], ["len=nan"]), (["len=x"], [])):
        with pytest.raises(UserError, match="len="):
            build_combined([], [f"len={ME}:length_fn"], weights, floors)


# --------------------------------------------------------------------------- reward-model losses, pure


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_bradley_terry_margin_sign_and_centering_in_float64():
    """L = −log σ(r_w − r_l − m) + c (r_w + r_l)² (Llama 2 margin: a larger margin asks for a
    larger gap, so it raises the loss; Eisenstein et al. 2023 centering)."""
    from posttrain.losses.preference import bradley_terry_loss

    g = torch.Generator().manual_seed(1)
    w, l = torch.randn(64, generator=g, dtype=torch.float64) * 3, torch.randn(64, generator=g, dtype=torch.float64) * 3
    m = torch.rand(64, generator=g, dtype=torch.float64) * 2
    c = 0.037
    got = bradley_terry_loss(w, l, m, c)
    expected = [-_logsig(a - b - mm) + c * (a + b) ** 2 for a, b, mm in zip(w.tolist(), l.tolist(), m.tolist())]
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-13)
    assert bool((bradley_terry_loss(w, l, m) > bradley_terry_loss(w, l)).all())
    scalar = bradley_terry_loss(w, l, 0.5).tolist()
    assert scalar == pytest.approx([-_logsig(a - b - 0.5) for a, b in zip(w.tolist(), l.tolist())], rel=1e-12)


def test_ranking_loss_k2_to_k5_with_ties_invalid_slots_margins_and_centering():
    """For each prompt: −1/|pairs| Σ_{rank_i < rank_j} log σ(r_i − r_j − m·[K'=2]) + c (2·mean r)²,
    a prompt weighted once whatever its K' (InstructGPT), ties making no pair, absent slots
    ignored (their garbage rewards too)."""
    from posttrain.losses.preference import bradley_terry_loss, ranking_loss

    g = torch.Generator().manual_seed(2)
    ranks_by_prompt = [[0, 1], [1, 0], [0, 1, 1], [2, 0, 1], [0, 0, 1, 2], [3, 1, 1, 0], [0, 1, 2, 3, 4],
                       [1, 1, 0, 2, 2], [0, 0, 0, 1, 0]]
    p, k = len(ranks_by_prompt), 5
    rewards = torch.randn(p, k, generator=g, dtype=torch.float64) * 2
    ranks = torch.full((p, k), 7, dtype=torch.long)  # garbage where absent
    valid = torch.zeros(p, k, dtype=torch.bool)
    for i, rk in enumerate(ranks_by_prompt):
        ranks[i, : len(rk)] = torch.tensor(rk)
        valid[i, : len(rk)] = True
    margins = torch.rand(p, generator=g, dtype=torch.float64) * 1.5
    c = 0.021
    got = ranking_loss(rewards, ranks, valid, c, margins).tolist()
    for i, rk in enumerate(ranks_by_prompt):
        r = rewards[i, : len(rk)].tolist()
        m = margins[i].item() if len(rk) == 2 else 0.0
        pairs = [(a, b) for a in range(len(rk)) for b in range(len(rk)) if rk[a] < rk[b]]
        expected = -sum(_logsig(r[a] - r[b] - m) for a, b in pairs) / len(pairs)
        expected += c * (2 * statistics.fmean(r)) ** 2
        assert got[i] == pytest.approx(expected, rel=1e-12), (i, rk)
    # K' = 2 rows equal Bradley-Terry with the pair's margin and centering
    pair_rows = [0, 1]
    chosen = torch.stack([rewards[0, 0], rewards[1, 1]])
    rejected = torch.stack([rewards[0, 1], rewards[1, 0]])
    bt = bradley_terry_loss(chosen, rejected, margins[pair_rows], c).tolist()
    assert [got[i] for i in pair_rows] == pytest.approx(bt, rel=1e-12)


class _LookupScorer(torch.nn.Module):
    """An 'encoder' reward model whose score is a learnable value per first token id (so the loss
    can be checked against hand-set rewards, gradients included)."""

    def __init__(self, values: dict[int, float]):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(max(values) + 1, dtype=torch.float64))
        with torch.no_grad():
            for key, v in values.items():
                self.table[key] = v

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.table[input_ids[:, 0]][:, None]})()


def test_reward_model_loss_on_a_mixed_batch_keeps_pair_margins_and_weighs_prompts_once():
    """A pair with margin, a pair with the better response second, and a 4-way ranking with a tie
    in one batch (the ranking path): the summed loss equals Σ_prompts of the per-prompt formula,
    the pairs keep their margins, and the metrics (accuracy with score ties ½, margin, reward mean,
    mean square) are the per-prompt figures summed; use_margins=False drops the margins."""
    from posttrain.data.records import Example
    from posttrain.train.grouped import Item, collate_items
    from posttrain.train.reward import RewardModelLoss, reward_extras

    def seq(token):
        return Example([token, 9, 9], [-100, 9, 9], "t")

    values = {1: 0.4, 2: -0.3, 3: 1.1, 4: 2.0, 5: 0.5, 6: 0.5, 7: -1.0, 8: 0.2}
    items = [Item([seq(1), seq(2)], [0, 1], margin=0.6), Item([seq(3), seq(4)], [1, 0], margin=1.5),
             Item([seq(5), seq(6), seq(7), seq(8)], [0, 1, 1, 2], margin=None)]
    batch = collate_items(items, 0) | reward_extras(items)
    for use_margins in (True, False):
        model = _LookupScorer(values)
        loss, metrics = RewardModelLoss(model, centering=0.05, use_margins=use_margins)(**batch)
        expected = acc = mar = mean = sq = 0.0
        for item in items:
            r = [values[s.input_ids[0]] for s in item.sequences]
            m = (item.margin or 0.0) if use_margins and len(r) == 2 else 0.0
            pairs = item.ordered_pairs()
            expected += -sum(_logsig(r[a] - r[b] - m) for a, b in pairs) / len(pairs)
            expected += 0.05 * (2 * statistics.fmean(r)) ** 2
            acc += sum(1.0 if r[a] > r[b] else 0.5 if r[a] == r[b] else 0.0 for a, b in pairs) / len(pairs)
            mar += sum(r[a] - r[b] for a, b in pairs) / len(pairs)
            mean += statistics.fmean(r)
            sq += statistics.fmean(x * x for x in r)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-7)  # margins travel as float32
        assert {k: float(v) for k, v in metrics.items()} == pytest.approx(
            {"accuracy": acc, "margin": mar, "reward_mean": mean, "reward_sq_mean": sq}, rel=1e-12)
        assert acc % 1 != 0  # the ranking's pair (5, 6) of equal scores counted ½


# --------------------------------------------------------------------------- held-out metrics on hand-made scores


def _by_definition(rows):
    """rows: (scores, ranks) per prompt → accuracy (ties ½), margin, reward mean and the std of all
    rewards with each prompt's responses weighted 1/K' (per prompt, then averaged)."""
    acc = mar = mean = sq = 0.0
    for r, k in rows:
        pairs = [(a, b) for a in range(len(k)) for b in range(len(k)) if k[a] < k[b]]
        acc += sum(1.0 if r[a] > r[b] else 0.5 if r[a] == r[b] else 0.0 for a, b in pairs) / len(pairs)
        mar += sum(r[a] - r[b] for a, b in pairs) / len(pairs)
        mean += statistics.fmean(r)
        sq += statistics.fmean(x * x for x in r)
    n = len(rows)
    return {"accuracy": acc / n, "margin": mar / n, "reward_mean": mean / n,
            "reward_std": math.sqrt(max(sq / n - (mean / n) ** 2, 0.0))}


def _metrics(rows, dtype=torch.float64):
    from posttrain.train.reward import finish_reward_metrics, ranking_metrics

    k = max(len(r) for r, _ in rows)
    table = torch.full((len(rows), k), 123.0, dtype=dtype)  # garbage in absent slots
    ranks = torch.zeros((len(rows), k), dtype=torch.long)
    valid = torch.zeros((len(rows), k), dtype=torch.bool)
    for i, (r, rk) in enumerate(rows):
        table[i, : len(r)] = torch.tensor(r, dtype=dtype)
        ranks[i, : len(rk)] = torch.tensor(rk)
        valid[i, : len(rk)] = True
    sums = ranking_metrics(table, ranks, valid)
    return finish_reward_metrics({name: float(v) / len(rows) for name, v in sums.items()})


def test_rm_metrics_on_hand_made_scores_with_ties():
    rows = [([1.0, 1.0], [0, 1]),                 # a score tie: ½
            ([0.5, 2.0], [1, 0]),                 # right, better second
            ([3.0, 1.0, 1.0, -2.0], [0, 1, 1, 2]),  # a rank tie: no pair between slots 1 and 2
            ([0.0, 1.0, 2.0], [0, 1, 2])]         # all wrong
    got = _metrics(rows)
    expected = _by_definition(rows)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got["accuracy"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)


def test_rm_reward_std_survives_an_offset_in_float32_scores():
    """A reward model without centering drifts: scores 300 ± 0.05 (float32, as `score` returns
    them). The logged std must be that of the scores, not of float32 round-off."""
    g = torch.Generator().manual_seed(0)
    scores = (300 + 0.05 * torch.randn(64, 2, generator=g, dtype=torch.float64)).float()
    rows = [(s.tolist(), [0, 1]) for s in scores]
    expected = _by_definition([([float(x) for x in r], k) for r, k in rows])["reward_std"]
    assert expected == pytest.approx(0.05, abs=0.01)
    assert _metrics(rows, torch.float32)["reward_std"] == pytest.approx(expected, rel=1e-3)


# --------------------------------------------------------------------------- a BERT-like encoder reward model


LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def bert_rm(tmp_path_factory):
    """A WordPiece tokenizer and a tiny BertModel (no head, no pooler weights are missing: a
    BertModel checkpoint) saved offline, trained 3 steps by `run_rm` on letter pairs."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from posttrain.config import RMConfig
    from posttrain.models.presets import corpus_path
    from posttrain.train.reward import run_rm

    out = tmp_path_factory.mktemp("bert-rm")
    words = set(re.findall(r"[a-z]+|[0-9]", corpus_path().read_text().lower()))
    words |= set(string.punctuation) | {"im", "user", "assistant", "system"}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=0)).save_pretrained(out / "bert")
    tok.save_pretrained(out / "bert")
    rows = []
    for i in range(16):
        letters = [LETTERS[(i * 7 + k * 5) % 26] for k in range(3)]
        rows.append({"prompt": "Smallest letter: " + " ".join(letters), "chosen": min(letters),
                     "rejected": max(letters)})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    run_dir = run_rm(RMConfig.from_dict({
        "output_dir": str(out / "run"), "model": {"path": str(out / "bert")},
        "data": {"train_files": [str(out / "train.jsonl")], "eval_files": [str(out / "eval.jsonl")],
                 "max_length": 1024},  # beyond the 128 positions: capped to them
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress_bar": False, "resume": "never"}}))
    return run_dir / "final"


def test_encoder_reward_model_trains_on_its_own_cls_sep_encoding_within_its_positions(bert_rm):
    """What the stage trained on: [CLS] ... [SEP] around each sequence, cut to the encoder's 128
    positions (data.max_length 1024 asked for more)."""
    from transformers import AutoTokenizer

    from posttrain.config import RMConfig
    from posttrain.data.preferences import prepare_preference_data

    report = json.loads((bert_rm.parent / "data_report.json").read_text())
    assert "128" in report["train_length"]["summary"], report["train_length"]
    tok = AutoTokenizer.from_pretrained(bert_rm)
    cfg = RMConfig.from_dict({"model": {"path": str(bert_rm)}, "data": {
        "train_files": [str(bert_rm.parent.parent / "train.jsonl")], "eval_fraction": 0.0, "max_length": 128}})
    data = prepare_preference_data(cfg.data, tok, bert_rm.parent / "again", 0, log=lambda _: None,
                                   special_tokens=True)
    for example in data.train:
        for seq in example.sequences:
            assert seq.input_ids[0] == tok.cls_token_id and seq.input_ids[-1] == tok.sep_token_id


def test_encoder_reward_model_trains_and_saves_a_plain_sequence_classifier(bert_rm):
    """The run trains the encoder (its held-out figures move) and `final` loads in plain
    transformers as a BertForSequenceClassification with one output."""
    from transformers import AutoModelForSequenceClassification

    summary = json.loads((bert_rm.parent / "summary.json").read_text())
    assert summary["eval_before"] != summary["eval_after"]
    hf = AutoModelForSequenceClassification.from_pretrained(bert_rm)
    assert type(hf).__name__ == "BertForSequenceClassification" and hf.config.num_labels == 1


def test_encoder_score_is_the_cls_pooled_score_of_the_tokenizers_own_encoding(bert_rm):
    """README: encoders are scored by 'the model's own pooling (the [CLS] head)', and the output is
    a plain HF directory. The reference: the saved tokenizer renders the conversation with its
    saved chat template and encodes it as BERT expects ([CLS] … [SEP]); plain transformers scores it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.rewards import RewardModelScorer

    tok = AutoTokenizer.from_pretrained(bert_rm)
    hf = AutoModelForSequenceClassification.from_pretrained(bert_rm).eval()
    responses = ["m", "q"]
    expected = []
    for r in responses:
        text = tok.apply_chat_template(TURNS + [{"role": "assistant", "content": r}], tokenize=False)
        enc = tok(text, return_tensors="pt")
        assert enc["input_ids"][0, 0] == tok.cls_token_id
        with torch.no_grad():
            expected.append(float(hf(**enc).logits[0, 0]))
    got = RewardModelScorer(str(bert_rm))([TURNS] * 2, responses)
    assert got == pytest.approx(expected, abs=1e-5)


def test_scorer_cuts_a_row_longer_than_the_encoders_position_table(bert_rm):
    from posttrain.rewards import RewardModelScorer

    got = RewardModelScorer(str(bert_rm))([TURNS], ["a b " * 100])  # ~236 tokens; the model has 128 positions
    assert len(got) == 1 and math.isfinite(got[0])


def test_encoder_batch_score_equals_each_row_alone_and_takes_zero_token_types(bert_rm):
    """The scorer on a right-padded batch of different lengths equals transformers on each row
    alone, and with explicit all-zero token_type_ids (what a BERT tokenizer gives one segment)."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.data.preferences import encode_response
    from posttrain.rewards import RewardModelScorer

    scorer = RewardModelScorer(str(bert_rm), batch_size=3)
    hf = AutoModelForSequenceClassification.from_pretrained(bert_rm).eval()
    responses = ["m", "a much longer answer than the others", "zz"]
    got = scorer([TURNS] * 3, responses)
    expected = []
    for r in responses:
        ids = torch.tensor([encode_response(TURNS, r, scorer.tokenizer, scorer.template,
                                             special_tokens=True).input_ids])
        with torch.no_grad():
            expected.append(float(hf(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits[0, 0]))
    assert got == pytest.approx(expected, abs=1e-5)

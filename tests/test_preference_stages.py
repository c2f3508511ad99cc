"""Reward-model and DPO stages on the tiny preset: log-probs, batching, reference, invariants, runs.

The losses themselves are checked in test_losses_preference.py; here the question is
whether the stages feed them the right numbers: concatenated forward == separate forwards,
left == right padding, precomputed == live reference, K-way weights, KTO's mismatched
rows, accumulation invariance, and short end-to-end runs of every loss.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.config import DPOConfig, DPOLossConfig, RMConfig
from posttrain.data.preferences import PreferenceRecord, encode_preference
from posttrain.data.templates import CHATML
from posttrain.errors import ConfigError, DataError
from posttrain.models.loading import load_model, load_tokenizer
from posttrain.train.grouped import Item, collate_items, items_from_examples
from posttrain.train.preference import PreferenceLoss, kto_extras, kto_items, pair_extras, policy_logps
from posttrain.train.reward import RewardModelLoss, ranking_metrics, reward_extras


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def _items(tokenizer, rows):
    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(k), source=f"t:{i}")
               for i, (p, r, k) in enumerate(rows)]
    return items_from_examples([encode_preference(rec, tokenizer, CHATML) for rec in records])


PAIRS = [("Smallest letter: q m t", ("m", "t"), (0, 1)), ("Copy: a b", ("a b", "b a b a"), (0, 1)),
         ("Reverse: x y z w", ("w z y x", "x y z w"), (0, 1))]


def _naive_logps(model, example) -> float:
    """Σ log softmax over the full logits of one unpadded sequence: the plain definition."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(float(logprobs[t - 1, tok]) for t, tok in enumerate(example.labels) if tok != -100)


def test_batched_logps_equal_one_sequence_at_a_time_and_left_padding_equals_right(tokenizer):
    model = load_model("tiny").eval()
    items = _items(tokenizer, PAIRS)
    batch = collate_items(items, tokenizer.pad_token_id)  # right padded, one forward for all 6
    with torch.no_grad():
        right, counts = policy_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"], chunk_size=7)
    naive = [_naive_logps(model, seq) for item in items for seq in item.sequences]
    assert right.tolist() == pytest.approx(naive, abs=1e-4)
    assert counts.tolist() == [sum(t != -100 for t in s.labels) for item in items for s in item.sequences]
    # left padding: shift every row's tokens to the end
    ids, labels, mask = (batch[k].clone() for k in ("input_ids", "labels", "attention_mask"))
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        for t in (ids, labels, mask):
            t[row] = torch.roll(t[row], ids.shape[1] - n)
    with torch.no_grad():
        left, _ = policy_logps(model, ids, labels, mask)
    assert left.tolist() == pytest.approx(right.tolist(), abs=1e-4)


def test_dpo_batch_loss_matches_the_formula_on_separately_computed_logps(tokenizer):
    torch.manual_seed(0)
    model = load_model("tiny")
    items = _items(tokenizer, PAIRS)
    ref = [[-3.0, -5.5], [-7.0, -6.0], [-4.0, -4.25]]
    for item, r in zip(items, ref):
        item.reference_logps = r
    batch = collate_items(items, tokenizer.pad_token_id) | pair_extras(items)
    module = PreferenceLoss(model.eval(), DPOLossConfig(loss="dpo", beta=0.3))
    with torch.no_grad():
        loss, metrics = module(**batch)
    expected, accuracy = 0.0, 0.0
    for item, (rc, rr) in zip(items, ref):
        pc, pr = (_naive_logps(model, s) for s in item.sequences)
        h = 0.3 * ((pc - rc) - (pr - rr))
        expected += -math.log(1 / (1 + math.exp(-h)))
        accuracy += h > 0
    assert float(loss) == pytest.approx(expected, abs=1e-4)
    assert float(metrics["rewards/accuracy"]) == accuracy


def test_kway_rankings_expand_to_ordered_pairs_weighted_per_prompt(tokenizer):
    items = _items(tokenizer, [("Count letters: a b c", ("3", "4", "2", "5"), (0, 1, 1, 2)), PAIRS[0]])
    extras = pair_extras(items)
    # 4 responses with one tie: 1+1+1 (best over the rest) + 1+1 (the two middle over the worst) = 5 pairs
    assert extras["chosen_row"].tolist() == [0, 0, 0, 1, 2, 4]
    assert extras["rejected_row"].tolist() == [1, 2, 3, 3, 3, 5]
    assert extras["pair_weight"].tolist() == pytest.approx([0.2] * 5 + [1.0])
    assert float(extras["pair_weight"].sum()) == pytest.approx(2.0)  # each prompt counts once


def test_kto_items_split_pairs_and_pair_each_prompt_with_another_prompts_response(tokenizer):
    items = kto_items(_items(tokenizer, PAIRS[:2]), max_length=512)
    assert [item.desirable for item in items] == [True, False, True, False]
    # the two sides of a pair share a prompt: each item's partner is the other pair's item in its place
    first, second = items[0].sequences[0], items[2].sequences[0]
    mismatched = items[0].sequences[1]
    cut = next(i for i, t in enumerate(first.labels) if t != -100)
    start = next(i for i, t in enumerate(second.labels) if t != -100)
    assert mismatched.input_ids == first.input_ids[:cut] + second.input_ids[start:]
    assert [t for t in mismatched.labels if t != -100] == [t for t in second.labels if t != -100]
    extras = kto_extras(items)
    assert extras["completion_row"].tolist() == [0, 2, 4, 6] and extras["kl_row"].tolist() == [1, 3, 5, 7]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_live_reference_equals_precomputed_and_starts_at_log2(tokenizer, method, tmp_path):
    from posttrain.train.preference import precompute_reference
    from posttrain.train.sft import build_model

    cfg = DPOConfig.load(None, [f"adapter.method={method}", f"output_dir={tmp_path}"])
    _, model, _ = build_model(cfg, lambda *_: None)
    items = _items(tokenizer, PAIRS)
    precompute_reference(model, items, cfg, tokenizer.pad_token_id, tmp_path / "ref.safetensors", print)
    batch = collate_items(items, tokenizer.pad_token_id) | pair_extras(items)
    live = PreferenceLoss(model, cfg.dpo, live_reference=True)
    cached = PreferenceLoss(model, cfg.dpo, live_reference=False)
    assert bool(live._frozen) == (method == "full")  # a weight copy only where adapters cannot be disabled
    live_loss, _ = live(**{k: v for k, v in batch.items() if k != "reference_logps"})
    cached_loss, metrics = cached(**batch)
    assert float(live_loss.detach()) == pytest.approx(float(cached_loss.detach()), abs=1e-5)
    assert float(cached_loss.detach()) == pytest.approx(3 * math.log(2), abs=1e-4)  # π = π_ref: every pair at log 2
    assert float(metrics["rewards/accuracy"]) == 1.5  # ties count one half


def test_reference_cache_is_reused_only_while_data_match(tokenizer, tmp_path):
    from posttrain.train.preference import precompute_reference

    cfg = DPOConfig.load(None, [])
    model = load_model("tiny")
    lines = []
    items = _items(tokenizer, PAIRS)
    precompute_reference(model, items, cfg, tokenizer.pad_token_id, tmp_path / "ref.safetensors", lines.append)
    again = _items(tokenizer, PAIRS)
    precompute_reference(model, again, cfg, tokenizer.pad_token_id, tmp_path / "ref.safetensors", lines.append)
    assert "reused" in lines[-1] and [i.reference_logps for i in again] == [i.reference_logps for i in items]
    changed = _items(tokenizer, PAIRS[:2])
    precompute_reference(model, changed, cfg, tokenizer.pad_token_id, tmp_path / "ref.safetensors", lines.append)
    assert "computed" in lines[-1]


def test_reward_ranking_metrics_by_hand():
    table = torch.tensor([[2.0, 1.0, 1.0], [0.0, 3.0, 0.0]])
    ranks = torch.tensor([[0, 1, 2], [0, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    m = ranking_metrics(table, ranks, valid)
    # prompt 1: pairs (0>1) right, (0>2) right, (1>2) tie = 2.5/3; prompt 2: (0>1) wrong = 0
    assert float(m["accuracy"]) == pytest.approx(2.5 / 3)
    assert float(m["margin"]) == pytest.approx((1 + 1 + 0) / 3 + (-3.0))
    assert float(m["reward_mean"]) == pytest.approx(4 / 3 + 1.5)


def test_reward_model_scores_the_last_real_token_and_pairs_use_bradley_terry(tokenizer):
    from posttrain.losses.preference import bradley_terry_loss
    from posttrain.models.reward_model import load_reward_model, score

    model = load_reward_model("tiny", pad_token_id=tokenizer.pad_token_id).eval()
    items = _items(tokenizer, PAIRS)
    for item, m in zip(items, (0.5, 0.0, 1.0)):
        item.margin = m
    batch = collate_items(items, tokenizer.pad_token_id) | reward_extras(items)
    with torch.no_grad():
        rewards = score(model, batch["input_ids"], batch["attention_mask"])
        singles = [float(model(input_ids=torch.tensor([s.input_ids])).logits[0, 0]) for i in items for s in i.sequences]
        loss, _ = RewardModelLoss(model, centering=0.01)(**batch)
    assert rewards.tolist() == pytest.approx(singles, abs=1e-5)
    chosen, rejected = rewards[0::2], rewards[1::2]
    expected = bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 0.0, 1.0]), 0.01).sum()
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)


def _dpo_cfg(tmp_path, *extra):
    return DPOConfig.load(None, [f"output_dir={tmp_path}", "data.synthetic_size=48", "data.eval_fraction=0.2",
                                 "data.max_length=64", "train.batch_size=4", "train.lr=1e-3", "train.progress_bar=false",
                                 "train.resume=never", *extra])


def test_accumulation_gives_the_same_step_as_a_bigger_batch(tmp_path):
    """batch 4 × accumulation 1 == batch 1 × accumulation 4 (the loop divides by the step's pairs)."""
    from posttrain.train.preference import run_dpo

    runs = []
    for name, size, accum in (("a", 4, 1), ("b", 1, 4)):
        cfg = _dpo_cfg(tmp_path / name, "train.max_steps=1", f"train.batch_size={size}", f"train.grad_accum={accum}",
                       "data.synthetic_kind=ranking", "data.synthetic_responses=3")
        runs.append(json.loads((run_dpo(cfg) / "metrics.jsonl").read_text().splitlines()[0]))
    assert runs[0]["loss"] == pytest.approx(runs[1]["loss"], abs=1e-6)
    assert runs[0]["grad_norm"] == pytest.approx(runs[1]["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("extra", [["dpo.loss=ipo"], ["dpo.loss=cdpo"], ["dpo.loss=hinge"], ["dpo.loss=simpo", "dpo.beta=2"],
                                   ["dpo.loss=orpo"], ["dpo.loss=kto", "data.synthetic_kind=unpaired"],
                                   ["adapter.method=lora", "dpo.reference=live", "dpo.nll_weight=0.5"],
                                   ["data.synthetic_kind=ranking", "adapter.method=prompt", "train.lr=3e-2"]],
                         ids=["ipo", "cdpo", "hinge", "simpo", "orpo", "kto", "lora-live-rpo", "ranking-prompt"])
def test_every_loss_trains_end_to_end(extra, tmp_path):
    from posttrain.train.preference import run_dpo

    run_dir = run_dpo(_dpo_cfg(tmp_path, "train.max_steps=3", *extra))
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and all(math.isfinite(r.get("loss", 0.0)) for r in records)
    assert (run_dir / "final").is_dir()
    expected = {"kto": "kl", "orpo": "log_odds_ratio"}.get(summary["loss"], "rewards/margins")
    assert expected in records[0] and f"eval_{expected}" in records[-1]


def test_under_bf16_autocast_the_precomputed_reference_still_starts_at_log2(tmp_path):
    """The reference pass runs in training's precision: computed in fp32 while the policy runs
    under bf16 autocast, step 0 gave 0.6993 instead of log 2 on a GPU."""
    from posttrain.train.preference import run_dpo

    run_dir = run_dpo(_dpo_cfg(tmp_path, "train.max_steps=1", "train.mixed_precision=bf16", "train.log_every=1"))
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["eval_before"]["rewards/accuracy"] == pytest.approx(0.5)  # every held-out margin exactly 0


def test_reward_model_run_with_rankings_and_lora(tmp_path):
    from posttrain.train.reward import run_rm

    cfg = RMConfig.load(None, [f"output_dir={tmp_path}", "data.synthetic_size=40", "data.synthetic_kind=ranking",
                               "data.max_length=64", "train.max_steps=3", "train.batch_size=4", "train.lr=1e-3",
                               "adapter.method=lora", "train.progress_bar=false"])
    run_dir = run_rm(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["eval_after"]) == {"accuracy", "margin", "reward_mean", "reward_std"}
    assert (run_dir / "final" / "adapter_config.json").is_file()


def test_an_encoder_backbone_trains_as_a_reward_model_and_scores(tmp_path):
    """A BERT-like encoder (its own [CLS] pooling and classifier) as the reward backbone."""
    from transformers import BertConfig, BertForSequenceClassification

    from posttrain.models.loading import load_tokenizer
    from posttrain.rewards import RewardModelScorer
    from posttrain.train.reward import run_rm

    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    cfg = RMConfig.load(None, [f"output_dir={tmp_path / 'rm'}", f"model.path={tmp_path / 'bert'}",
                               "data.synthetic_size=40", "data.max_length=64", "train.max_steps=3", "train.batch_size=4",
                               "train.lr=1e-3", "train.progress_bar=false"])
    run_dir = run_rm(cfg)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    turns = [{"role": "user", "content": "Smallest letter: q m t"}]
    scores = RewardModelScorer(str(run_dir / "final"))([turns, turns], ["m", "q"])
    assert len(scores) == 2 and scores[0] != scores[1]


def test_configs_are_checked_before_any_work(tmp_path):
    from posttrain.train.preference import run_dpo
    from posttrain.train.reward import run_rm

    with pytest.raises(ConfigError, match="pairs or rankings, not unpaired"):
        run_rm(RMConfig.load(None, ["data.synthetic_kind=unpaired", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="full or lora"):
        run_rm(RMConfig.load(None, ["adapter.method=ia3", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="dpo.beta must be positive"):
        run_dpo(DPOConfig.load(None, ["dpo.beta=0", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="did you mean dpo.beta"):
        DPOConfig.load(None, ["dpo.bta=0.1"])
    with pytest.raises(ConfigError, match="use dpo.loss=kto"):
        run_dpo(DPOConfig.load(None, ["data.synthetic_kind=unpaired", f"output_dir={tmp_path}"]))
    unpaired = tmp_path / "unpaired.jsonl"  # detected from the file: known only once read
    unpaired.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a", "label": i % 2 == 0}) + "\n"
                                for i in range(8)))
    with pytest.raises(DataError, match="use dpo.loss=kto"):
        run_dpo(_dpo_cfg(tmp_path, f"data.train_files=[{unpaired}]", "train.max_steps=1"))


def test_items_of_unequal_size_collate_with_their_reference(tokenizer):
    items = _items(tokenizer, [PAIRS[0], ("Count letters: a b c", ("3", "4", "2"), (0, 1, 2))])
    for item in items:
        item.reference_logps = [-1.0] * len(item.sequences)
    batch = collate_items(items, tokenizer.pad_token_id)
    assert batch["group"].tolist() == [0, 0, 1, 1, 1] and batch["slot"].tolist() == [0, 1, 0, 1, 2]
    assert batch["reference_logps"].shape == (5,)
    assert isinstance(items[0], Item)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("row_width", [0, 64, 1000], ids=["row_per_item", "two_rows", "one_row"])
def test_shared_prompt_rows_give_the_same_logps_and_gradients_as_separate_rows(tokenizer, method, row_width):
    """Prompt once + each response under a 4-D mask == every prompt+response sequence on its own,
    with the items (26, 27, 32 and 27 tokens) each in its own row, packed two to a row, or all in one."""
    from posttrain.train.grouped import collate_shared_prompt, shares_prompt
    from posttrain.train.preference import batch_logps
    from posttrain.train.sft import build_model

    _, model, _ = build_model(DPOConfig.load(None, [f"adapter.method={method}"]), lambda *_: None)
    items = _items(tokenizer, PAIRS + [("Count letters: a b c", ("3", "4", "2"), (0, 1, 2))])
    assert all(shares_prompt(item) for item in items)
    separate = collate_items(items, tokenizer.pad_token_id)
    shared = collate_shared_prompt(items, tokenizer.pad_token_id, row_width)
    assert len(shared["input_ids"]) == {0: 4, 64: 2, 1000: 1}[row_width]
    assert shared["input_ids"].numel() < separate["input_ids"].numel()
    results = []
    for batch in (separate, shared):
        model.zero_grad()
        logps, counts = batch_logps(model, batch, chunk_size=5)
        (logps * torch.linspace(1, 2, len(logps))).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((logps.detach(), counts, grads))
    assert results[1][0].tolist() == pytest.approx(results[0][0].tolist(), abs=1e-4)
    assert results[1][1].tolist() == results[0][1].tolist()
    for a, b in zip(results[0][2], results[1][2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("row_width", [0, 1000], ids=["row_per_item", "one_row"])
def test_reward_model_on_shared_prompt_rows_equals_separate_rows(tokenizer, method, row_width):
    """Prompt once + each response (pairs and a 3-way ranking) under a 4-D mask, each item in its
    own row or all packed in one: the same rewards, loss and gradients as every prompt+response
    row on its own."""
    from posttrain.config import LoraConfig
    from posttrain.models.reward_model import add_lora, load_reward_model
    from posttrain.train.grouped import collate_shared_prompt

    torch.manual_seed(0)
    model = load_reward_model("tiny", pad_token_id=tokenizer.pad_token_id)
    if method == "lora":
        model = add_lora(model, LoraConfig())
    items = _items(tokenizer, PAIRS + [("Count letters: a b c", ("3", "4", "2"), (0, 1, 2))])
    separate = collate_items(items, tokenizer.pad_token_id) | reward_extras(items)
    shared = collate_shared_prompt(items, tokenizer.pad_token_id, row_width) | reward_extras(items)
    assert shared["input_ids"].numel() < separate["input_ids"].numel()
    assert shared["group"].tolist() == separate["group"].tolist() and shared["slot"].tolist() == separate["slot"].tolist()
    loss_module = RewardModelLoss(model, centering=0.01)
    results = []
    for batch in (separate, shared):
        model.zero_grad()
        loss, metrics = loss_module(**batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((float(loss.detach()), {k: float(v) for k, v in metrics.items()}, grads))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    assert results[1][1] == pytest.approx(results[0][1], abs=1e-5)
    for a, b in zip(results[0][2], results[1][2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and each reward is the model's own score of the sequence alone
        from posttrain.models.reward_model import score, score_shared_prompt

        rewards = score_shared_prompt(model, shared["input_ids"], shared["attention_mask"], shared["position_ids"],
                                      shared["last_token"])
        singles = [float(score(model, torch.tensor([s.input_ids]), torch.ones(1, len(s), dtype=torch.long)))
                   for item in items for s in item.sequences]
    assert rewards.tolist() == pytest.approx(singles, abs=1e-5)


def test_reward_model_runs_alike_with_and_without_shared_prompts(tmp_path):
    from posttrain.train.reward import run_rm

    runs = []
    for share in ("true", "false"):
        cfg = RMConfig.load(None, [f"output_dir={tmp_path / share}", "data.synthetic_size=40", "data.max_length=64",
                                   "train.max_steps=3", "train.batch_size=4", "train.lr=1e-3",
                                   "train.progress_bar=false", f"reward.share_prompt={share}"])
        run_dir = run_rm(cfg)
        runs.append([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
    losses = [[r["loss"] for r in run if "loss" in r] for run in runs]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert runs[0][-1]["eval_accuracy"] == pytest.approx(runs[1][-1]["eval_accuracy"])


@pytest.mark.parametrize("stage", ["dpo", "dpo-lora", "rm"])
def test_gradient_checkpointing_changes_no_loss(stage, tmp_path, monkeypatch):
    """model.gradient_checkpointing recomputes the forward in the backward: the same losses, step
    for step, on shared-prompt rows (DPO, full and LoRA; the reward model). Counting calls to
    torch's checkpoint (transformers imports the name, so both are patched) shows it was on; the
    chunked log-probs checkpoint too, so "on" means more calls."""
    import torch.utils.checkpoint

    from posttrain.train.preference import run_dpo
    from posttrain.train.reward import run_rm

    calls = {"n": 0}
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    import transformers.modeling_utils

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)  # it imported the name
    losses, counts = [], []
    for gc in ("false", "true"):
        calls["n"] = 0
        overrides = [f"output_dir={tmp_path / gc}", "data.synthetic_size=48", "data.eval_fraction=0.2",
                     "data.max_length=64", "train.batch_size=4", "train.lr=1e-3", "train.progress_bar=false",
                     "train.resume=never", "train.max_steps=3", f"model.gradient_checkpointing={gc}"]
        if stage == "rm":
            run_dir = run_rm(RMConfig.load(None, overrides))
        else:
            run_dir = run_dpo(DPOConfig.load(None, overrides + (["adapter.method=lora"] if stage == "dpo-lora" else [])))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in records if "loss" in r])
        counts.append(calls["n"])
    assert counts[1] > counts[0]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], abs=1e-6)

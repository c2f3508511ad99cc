"""Stop 32, preference data beyond the pinned walkthrough (tests/test_walkthrough_prefdata.py):
the held-out split by prompt (`pipeline.split_eval`'s key), pair rows whose text sides repeat the
prompt, the margin DPO does not read, and the NLL term's weights on pairs and tied best ranks."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from posttrain.errors import DataError
from tests.test_walkthrough_prefdata import _jsonl, _quiet


@pytest.fixture(scope="module")
def tok():
    from posttrain.data.templates import adopt_template
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    return tokenizer, adopt_template(tokenizer, "auto")




# --------------------------------------------------------------------------- split_eval's key


def _old_split(records, fraction, seed):
    """split_eval as it was before the key: the rule a keyless split keeps."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, round(fraction * len(records))))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


@pytest.mark.parametrize("n, fraction, seed", [(2, 0.5, 0), (10, 0.05, 1), (37, 0.2, 3), (5, 0.99, 2), (1, 0.5, 0)])
def test_split_eval_without_a_key_is_unchanged(n, fraction, seed):
    from posttrain.data.pipeline import split_eval

    records = [f"r{i}" for i in range(n)]
    assert split_eval(records, fraction, seed) == _old_split(records, fraction, seed)


def test_split_eval_with_a_key_holds_out_whole_groups_and_leaves_one_to_train():
    from posttrain.data.pipeline import split_eval

    records = [(g, k) for g in range(10) for k in range(g % 3 + 1)]  # groups of 1, 2 or 3 rows
    for seed in range(5):
        train, held = split_eval(records, 0.2, seed, key=lambda r: r[0])
        assert {g for g, _ in train}.isdisjoint({g for g, _ in held})
        assert len(held) >= round(0.2 * len(records)) and sorted(train + held) == sorted(records)
    one = [("same", k) for k in range(4)]
    assert split_eval(one, 0.5, 0, key=lambda r: r[0]) == (one, [])  # one prompt: nothing can be held out
    two = [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    train, held = split_eval(two, 0.99, 0, key=lambda r: r[0])
    assert train and held and {g for g, _ in train} != {g for g, _ in held}  # never every group held out


def test_preference_split_reports_unique_prompts_and_says_when_one_prompt_holds_all(tmp_path, tok):
    from posttrain.config import PreferenceDataConfig
    from posttrain.data.preferences import prepare_preference_data

    rows = [{"prompt": f"Question {i % 5}: which colour?", "chosen": f"Blue {i}.", "rejected": f"Green {i}."}
            for i in range(20)]
    cfg = PreferenceDataConfig(train_files=[str(_jsonl(tmp_path / "p.jsonl", rows))], eval_fraction=0.2, max_length=128)
    data = prepare_preference_data(cfg, tok[0], None, seed=0, log=_quiet)
    assert data.report["eval_read"]["held_out_prompts_unique"] is True
    assert data.report["eval_read"]["prompts"] == 1 and data.report["eval_records"] == 4  # one prompt of 4 rows
    said = []
    same = [{"prompt": "One question only?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(6)]
    cfg = PreferenceDataConfig(train_files=[str(_jsonl(tmp_path / "one.jsonl", same))], eval_fraction=0.2,
                               max_length=128)
    data = prepare_preference_data(cfg, tok[0], None, seed=0, log=said.append)
    assert not data.eval and len(data.train) == 6
    assert any("share one prompt" in line for line in said), said


# --------------------------------------------------------------------------- sides repeating the prompt


def test_text_sides_that_repeat_a_text_prompt_are_bad_rows(tmp_path):
    from posttrain.data.preferences import load_preference_records

    prompt = "\n\nHuman: What colour is the sky?\n\nAssistant:"
    rows = [{"prompt": prompt, "chosen": prompt + " Blue.", "rejected": prompt + " Green."},
            {"prompt": prompt.strip(), "chosen": prompt + " Blue.", "rejected": prompt + " Red."}]
    path = _jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError) as exc:
        load_preference_records([str(path)], log=_quiet)
    for line in (1, 2):
        assert f"hh.jsonl:{line}: 'chosen' and 'rejected' both begin with the whole 'prompt' text" in str(exc.value)
    assert "replies alone" in str(exc.value)


@pytest.mark.parametrize("row", [
    {"prompt": "Say hi", "chosen": "Say hi to you.", "rejected": "Say hi back."},  # a short prompt: chance
    {"prompt": "What colour is the sky?", "chosen": "What colour is the sky? Blue.", "rejected": "Green."},  # one side
    {"prompt": "What colour is the sky?", "chosen": [{"role": "user", "content": "What colour is the sky?"},
                                                     {"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "user", "content": "What colour is the sky?"},
                  {"role": "assistant", "content": "Green."}]},  # turns: the prompt turn is checked and stripped
], ids=["short-prompt", "one-side", "turns"])
def test_sides_that_do_not_both_repeat_a_real_prompt_are_read(tmp_path, row):
    from posttrain.data.preferences import load_preference_records

    records, report = load_preference_records([str(_jsonl(tmp_path / "ok.jsonl", [row]))], log=_quiet)
    assert report.good == 1 and len(records[0].responses) == 2


# --------------------------------------------------------------------------- margin under dpo


def test_dpo_says_once_that_it_ignores_margins(tok):
    from posttrain.config import DPOConfig
    from posttrain.data.preferences import PreferenceRecord, encode_preference
    from posttrain.train.preference import _items

    tokenizer, template = tok
    prompt = [{"role": "user", "content": "Which colour?"}]
    records = [PreferenceRecord(prompt, ["Blue.", "Green."], ranks=[0, 1], margin=m, source=f"p:{i}")
               for i, m in enumerate([1.5, None, 0.5])]
    examples = [encode_preference(r, tokenizer, template) for r in records]
    said = []
    _items(SimpleNamespace(train=examples, eval=[]), DPOConfig(), said.append)
    assert [line for line in said if "margin" in line] == [
        "dpo: 2 records carry a 'margin'; margin is read by the reward model's loss only (posttrain rm), "
        "dpo.loss=dpo ignores it"]
    said.clear()
    _items(SimpleNamespace(train=examples[1:2], eval=[]), DPOConfig(), said.append)
    assert not said


# --------------------------------------------------------------------------- the NLL term's weights


def _batch(tok, records):
    from posttrain.data.preferences import encode_preference
    from posttrain.train.grouped import collate_items, items_from_examples
    from posttrain.train.preference import pair_extras

    tokenizer, template = tok
    items = items_from_examples([encode_preference(r, tokenizer, template) for r in records])
    for item in items:
        item.reference_logps = [-1.0 - k for k in range(len(item.sequences))]
    return collate_items(items, tokenizer.pad_token_id) | pair_extras(items)


@pytest.mark.parametrize("knobs", [{"loss": "orpo", "orpo_lambda": 0.3}, {"loss": "dpo", "nll_weight": 0.7},
                                   {"loss": "simpo", "nll_weight": 0.2}], ids=["orpo", "rpo", "simpo-nll"])
def test_pairs_keep_their_chosen_nll_bit_for_bit(tok, knobs):
    """K = 2: both weights 1, so the loss and every metric are those of each pair's own chosen NLL
    (the batch without `nll_pair_weight`), exactly."""
    from posttrain.config import DPOLossConfig
    from posttrain.data.preferences import PreferenceRecord
    from posttrain.models.loading import load_model
    from posttrain.train.preference import PreferenceLoss

    torch.manual_seed(0)
    module = PreferenceLoss(load_model("tiny").eval(), DPOLossConfig(**knobs))
    records = [PreferenceRecord([{"role": "user", "content": f"Q{i}?"}], [f"Yes {i}.", "No, not at all."],
                                ranks=[0, 1], source=f"p:{i}") for i in range(3)]
    batch = _batch(tok, records)
    assert batch["nll_pair_weight"].tolist() == [1.0, 1.0, 1.0]
    with torch.no_grad():
        loss, metrics = module(**batch)
        old_loss, old_metrics = module(**{k: v for k, v in batch.items() if k != "nll_pair_weight"})
    assert torch.equal(loss, old_loss)
    assert metrics.keys() == old_metrics.keys() and all(torch.equal(metrics[k], old_metrics[k]) for k in metrics)


def test_a_ranking_with_tied_best_answers_trains_their_mean_nll_once(tok):
    from posttrain.config import DPOLossConfig
    from posttrain.data.preferences import PreferenceRecord
    from posttrain.models.loading import load_model
    from posttrain.train.preference import PreferenceLoss, policy_logps

    torch.manual_seed(0)
    model = load_model("tiny").eval()
    record = PreferenceRecord([{"role": "user", "content": "Smallest letter: q m t"}], ["m", "M", "q", "t"],
                              ranks=[0, 0, 1, 2], source="r:1")
    batch = _batch(tok, [record])
    # pairs: (0,2) (0,3) (1,2) (1,3) (2,3); the best two share the NLL, the 2nd-ranked gets none
    assert batch["nll_pair_weight"].tolist() == [0.25, 0.25, 0.25, 0.25, 0.0]
    with torch.no_grad():
        logps, counts = policy_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        _, metrics = PreferenceLoss(model, DPOLossConfig(loss="dpo", nll_weight=1.0))(**batch)
    best = float(-(logps[:2] / counts[:2]).mean())
    assert float(metrics["nll"]) == pytest.approx(best, rel=1e-5)

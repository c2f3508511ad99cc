"""Preference and feedback data as public datasets lay it out, fed to posttrain's rm / dpo / kto data
layer (rows → records → token labels → items, pair weights, held-out split). TRL's own formats were
walked in test_walkthrough_migrant.py; this walk takes the layouts beyond them, built by hand in a few
rows each: Anthropic HH-RLHF (chosen / rejected as whole "\\n\\nHuman: ... \\n\\nAssistant: ..."
transcripts), UltraFeedback-binarized (a prompt string, sides as message lists that repeat the prompt
turn, score_chosen / score_rejected and a messages column beside them), UltraFeedback raw and Nectar
(K completions with ratings or 1-based ranks, ties), SHP (several comment pairs per post, score
ratios), KTO sets (prompt / completion / label, desirable and undesirable completions of one prompt)
and PKU-SafeRLHF (two responses and better / safer ids, two preferences per prompt).

Right on this walk: UltraFeedback-binarized rows read as pairs whatever columns sit beside them,
labelled on the final assistant reply only, the prompt's tokens shared by both sides; HH-RLHF's
transcript strings are refused row by row with file:line (never trained on as text); Nectar's 1-based
float ranks with ties become dense ranks, tied responses make no pair, and a 7-way prompt weighs
what a pair weighs in DPO and in the reward model.

Wrong on this walk: a file with several rows per prompt (SHP, PKU-SafeRLHF, HH, KTO sets) is split
into train and held-out by row, so "held-out" figures are taken on prompts (and responses) the run
trained on; and with a K-way ranking the NLL term (`dpo.nll_weight`, ORPO's SFT term) trains the
likelihood of every response that beats another, not of the preferred one: SFT on the 6th of 7.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 32: each asserts the right behaviour); the others pin behaviour that was right but had no test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import DataError


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def _quiet(*_):
    return None


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    from posttrain.data.templates import adopt_template
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    return tokenizer, adopt_template(tokenizer, "auto")


def _labelled(example, tokenizer) -> str:
    return tokenizer.decode([t for t in example.labels if t != -100])


def _prompt_ids(example) -> tuple[int, ...]:
    from posttrain.train.grouped import first_label

    return tuple(example.input_ids[:first_label(example)])


def _items(paths: list[Path], tok):
    from posttrain.data.preferences import encode_preference, load_preference_records
    from posttrain.train.grouped import items_from_examples

    tokenizer, template = tok
    records, _ = load_preference_records([str(p) for p in paths], log=_quiet)
    return items_from_examples([encode_preference(r, tokenizer, template) for r in records])


# Nectar: an HH-style prompt, 7 answers ranked 1..7 (floats), two tied at 2
_NECTAR = {"prompt": "Name a colour.", "responses": [f"Colour number {c}." for c in "abcdefg"],
           "ranks": [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0]}


# --------------------------------------------------------------------------- defects


def _shp_rows(posts: int) -> list[dict]:
    """SHP's layout, converted as its card says: each post's comments compared in pairs (A > B, A > C,
    B > C), the post as the prompt: three rows per prompt, the comments recurring across them."""
    rows = []
    for post in range(posts):
        history = f"Post {post}: which colour should I paint the shed?"
        comment = {k: f"Comment {k} on post {post}." for k in "ABC"}
        rows += [{"prompt": history, "chosen": comment[a], "rejected": comment[b]}
                 for a, b in (("A", "B"), ("A", "C"), ("B", "C"))]
    return rows


def _kto_rows(prompts: int) -> list[dict]:
    """A KTO set's layout: one prompt with a desirable and an undesirable completion, two rows."""
    return [{"prompt": [U(f"Question {i}: what colour is the sky?")], "completion": [A(text)], "label": label}
            for i in range(prompts) for text, label in (("Blue.", True), ("Green.", False))]


@pytest.mark.parametrize("layout", ["shp_pairs", "kto_unpaired"])
def test_held_out_preference_rows_share_no_prompt_with_training(tmp_path, tok, layout):
    """`data.eval_fraction` with no `data.eval_files`: the run logs "held-out pairwise accuracy ... (N
    prompts)". With several rows per prompt (SHP's comment pairs, PKU-SafeRLHF's better and safer
    pairs, a KTO set's two completions), the held-out rows' prompts must not be trained on."""
    from posttrain.config import PreferenceDataConfig
    from posttrain.data.preferences import prepare_preference_data

    rows = _shp_rows(20) if layout == "shp_pairs" else _kto_rows(30)
    path = _jsonl(tmp_path / f"{layout}.jsonl", rows)
    cfg = PreferenceDataConfig(train_files=[str(path)], eval_fraction=0.2, max_length=128)
    data = prepare_preference_data(cfg, tok[0], None, seed=0, log=_quiet)
    trained = {_prompt_ids(e.sequences[0]) for e in data.train}
    seen = [_prompt_ids(e.sequences[0]) in trained for e in data.eval]
    assert data.eval and not any(seen), (f"{sum(seen)} of {len(seen)} held-out records have a prompt that "
                                         f"{len(data.train)} training records train on")


@pytest.mark.parametrize("loss", ["orpo", "rpo"])
def test_the_nll_term_of_a_ranking_trains_the_best_response_only(tok, loss):
    """A Nectar / UltraFeedback-raw ranking (4 answers, 0 = best): ORPO's L_SFT and RPO's NLL are the
    SFT loss on the preferred response. Taken per ordered pair, half of it goes to the answers ranked
    2nd and 3rd (for 7 answers, 71%, the 6th of 7 included): with the verifiable synthetic rankings
    (`data.synthetic_kind=ranking`, "rankings ordered by how wrong") that is SFT on wrong answers."""
    from posttrain.config import DPOLossConfig
    from posttrain.data.preferences import PreferenceRecord, encode_preference
    from posttrain.models.loading import load_model
    from posttrain.train.grouped import collate_items, items_from_examples
    from posttrain.train.preference import PreferenceLoss, pair_extras, policy_logps

    tokenizer, template = tok
    torch.manual_seed(0)
    model = load_model("tiny").eval()
    record = PreferenceRecord([U("Smallest letter: q m t w")], ["m", "q", "t", "w"], ranks=[0, 1, 2, 3], source="r:1")
    items = items_from_examples([encode_preference(record, tokenizer, template)])
    items[0].reference_logps = [0.0] * 4
    batch = collate_items(items, tokenizer.pad_token_id) | pair_extras(items)
    with torch.no_grad():
        logps, counts = policy_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        nll_best = float(-(logps[0] / counts[0]))
        if loss == "orpo":  # λ = 0: ORPO is its SFT term alone
            nll, _ = PreferenceLoss(model, DPOLossConfig(loss="orpo", orpo_lambda=0.0))(**batch)
        else:
            with_nll, _ = PreferenceLoss(model, DPOLossConfig(loss="dpo", nll_weight=1.0))(**batch)
            without, _ = PreferenceLoss(model, DPOLossConfig(loss="dpo"))(**batch)
            nll = with_nll - without
    nll_each = (-(logps / counts)).tolist()
    assert float(nll) == pytest.approx(nll_best, rel=1e-4), (
        f"NLL term {float(nll):.4f}, the best response's NLL {nll_best:.4f}; per response {nll_each}")


# --------------------------------------------------------------------------- right, now pinned


def test_ultrafeedback_binarized_rows_train_only_the_reply(tmp_path, tok):
    """HuggingFaceH4/ultrafeedback_binarized's layout, from parquet: a prompt string, sides that repeat
    it as a user turn, and prompt_id / messages / score columns beside them. Read as pairs (not as
    SFT messages), each side labelled on its reply and end-of-turn marker, the prompt's tokens the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data.preferences import encode_preference, load_preference_records

    tokenizer, template = tok
    rows = [{"prompt": f"What colour is thing {i}?", "prompt_id": f"id{i}",
             "chosen": [U(f"What colour is thing {i}?"), A("Blue.")],
             "rejected": [U(f"What colour is thing {i}?"), A("Green, I think.")],
             "messages": [U(f"What colour is thing {i}?"), A("Blue.")],
             "score_chosen": 8.0, "score_rejected": 5.5} for i in range(3)]
    path = tmp_path / "train_prefs-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = load_preference_records([str(path)], log=_quiet)
    assert report.good == 3 and records[1].prompt == [U("What colour is thing 1?")]
    assert records[1].responses == ["Blue.", "Green, I think."] and records[1].ranks == [0, 1]
    chosen, rejected = encode_preference(records[1], tokenizer, template).sequences
    assert _labelled(chosen, tokenizer) == "Blue.<|im_end|>"
    assert _labelled(rejected, tokenizer) == "Green, I think.<|im_end|>"
    assert _prompt_ids(chosen) == _prompt_ids(rejected)
    assert "thing 1" in tokenizer.decode(_prompt_ids(chosen))


def test_hh_rlhf_transcript_strings_are_refused_by_row_never_trained_as_text(tmp_path):
    """Anthropic/hh-rlhf as published: no prompt, each side one string holding the whole transcript.
    Every row is named with its line and why; under skip each is kept in the rejects file."""
    from posttrain.data.preferences import load_preference_records

    rows = [{"chosen": f"\n\nHuman: What colour is thing {i}?\n\nAssistant: Blue.",
             "rejected": f"\n\nHuman: What colour is thing {i}?\n\nAssistant: Green."} for i in range(3)]
    path = _jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError) as exc:
        load_preference_records([str(path)], log=_quiet)
    for line in (1, 2, 3):
        assert f"hh.jsonl:{line}: no 'prompt', and 'chosen' is a string" in str(exc.value), str(exc.value)
    assert "lists of turns" in str(exc.value)
    with pytest.raises(DataError, match="no usable rows"):  # skipped, nothing is left to train on
        load_preference_records([str(path)], bad_rows="skip", max_bad_fraction=1.0, log=_quiet)
    converted = {"chosen": [U("What colour is thing 3?"), A("Blue.")], "rejected": [U("What colour is thing 3?"),
                                                                                    A("Green.")]}
    _jsonl(path, rows + [converted])  # one row turned into turns, as TRL's hh-rlhf-helpful-base has them
    rejects = tmp_path / "rejects.jsonl"
    records, report = load_preference_records([str(path)], bad_rows="skip", max_bad_fraction=1.0,
                                              rejects_path=str(rejects), log=_quiet)
    assert (len(records), report.bad, records[0].source.endswith("hh.jsonl:4")) == (1, 3, True)
    assert len(rejects.read_text().splitlines()) == 3


def test_nectar_ranking_with_ties_weighs_its_prompt_once_in_dpo_and_the_reward_model(tmp_path, tok):
    """Nectar's 1-based float ranks with a tie, beside a plain pair: dense ranks, no pair between the
    tied answers (20 ordered pairs of 21), pair weights summing to one per prompt; the reward model's
    ranking loss gives the 7-way prompt the weight of the pair (equal rewards: log 2 each)."""
    from posttrain.losses.preference import ranking_loss
    from posttrain.train.preference import pair_extras
    from posttrain.train.reward import reward_extras

    nectar = _jsonl(tmp_path / "nectar.jsonl", [_NECTAR])
    pair = _jsonl(tmp_path / "pair.jsonl", [{"prompt": "Name a shape.", "chosen": "A circle.", "rejected": "A dog."}])
    items = _items([nectar, pair], tok)
    assert items[0].ranks == [0, 1, 1, 2, 3, 4, 5]
    extras = pair_extras(items)
    pairs = list(zip(extras["chosen_row"].tolist(), extras["rejected_row"].tolist()))
    assert len(pairs) == 21 and (1, 2) not in pairs and (2, 1) not in pairs
    weights = extras["pair_weight"].tolist()
    assert sum(weights[:20]) == pytest.approx(1.0) and weights[20] == pytest.approx(1.0)
    r = reward_extras(items)
    losses = ranking_loss(torch.zeros(2, 7), r["ranks"], r["valid"], margins=r["margins"])
    assert losses.tolist() == pytest.approx([0.6931472, 0.6931472])

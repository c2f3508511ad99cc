"""The scale fixes: score --calibrate in one pass, near dedup holding only signatures, the label
mask as one merge pass, and a DPO reference cache that covers only the micro-batches a run reads."""

from __future__ import annotations

import random
import re

import pytest
import torch

from posttrain.config import DPOConfig


# --------------------------------------------------------------------------- score --calibrate


def test_calibrate_on_the_raw_values_equals_calibrate_then_score():
    from posttrain.rewards import CombinedReward, RewardComponent

    calls = []

    def length(prompts, responses):
        calls.append(len(responses))
        return [float(len(r)) for r in responses]

    prompts, responses = [[{"role": "user", "content": "q"}]] * 4, ["a", "bbb", "cc", "dddddd"]
    two = CombinedReward([RewardComponent("len", length, weight=2.0, floor=2.0)])
    two.calibrate(prompts, responses)
    expected = two.score(prompts, responses)
    one = CombinedReward([RewardComponent("len", length, weight=2.0, floor=2.0)])
    calls.clear()
    raw = one.raw(prompts, responses)
    one.calibrate_on(raw)
    assert (one.totals(raw), raw) == expected and calls == [4]


# --------------------------------------------------------------------------- label mask


def _labels_by_scan(ids, starts, spans):
    return [t if any(lo <= s < hi for lo, hi in spans) else -100 for t, s in zip(ids, starts)]


def test_label_merge_equals_the_scan_on_any_spans():
    """Sorted, overlapping, empty and unsorted spans: the merge labels what testing every token
    against every span labels; the straddled starts are the ones a scan finds."""
    from posttrain.data.templates import _labels_from_spans, _straddled_starts, _true_starts

    rng = random.Random(0)
    for _ in range(500):
        widths = [rng.randint(0, 4) for _ in range(rng.randint(0, 30))]
        offsets, at = [], 0
        for w in widths:
            start = at + rng.choice([0, 0, 1])  # a trimmed leading space now and then
            offsets.append((start, max(start, at + w)))
            at = max(start, at + w)
        ids = list(range(1, len(offsets) + 1))
        spans = [tuple(sorted(rng.sample(range(at + 2), 2))) for _ in range(rng.randint(0, 4))]
        starts = _true_starts(offsets)
        assert _labels_from_spans(ids, offsets, spans) == _labels_by_scan(ids, starts, spans)
        ordered = sorted(spans)
        scan = [lo for lo, _ in ordered if any(s < lo < e for s, (_, e) in zip(starts, offsets))]
        assert _straddled_starts(starts, offsets, ordered) == scan


# --------------------------------------------------------------------------- near dedup


def test_near_dedup_builds_shingle_sets_only_for_rows_in_candidate_pairs(monkeypatch):
    from posttrain.data.quality import dedup

    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(300)]
    texts += [texts[3] + " extra", texts[7] + " more words"]
    expected = dedup.near_duplicates(texts)
    built = []
    real = dedup.shingle_set
    monkeypatch.setattr(dedup, "shingle_set", lambda text, n: built.append(text) or real(text, n))
    assert dedup.near_duplicates(texts) == expected
    assert expected[0][300] is not None and expected[0][301] is not None
    # once each to sign, then again only for the rows the candidate pairs name
    assert len(texts) < len(built) <= len(texts) + 2 * expected[1]["candidate_pairs"]


# --------------------------------------------------------------------------- DPO reference cache


ARGS = ["data.synthetic_size=24", "data.eval_fraction=0.25", "data.max_length=48", "train.batch_size=4",
        "train.progress_bar=false", "eval.exact_match_prompts=0", "train.lr=1e-2", "train.save_every=1",
        "dpo.reference=precompute"]


def _dpo(tmp_path, out, capsys, *extra):
    from posttrain.train.preference import run_dpo

    capsys.readouterr()
    run_dpo(DPOConfig.load(None, [f"output_dir={tmp_path / out}", *ARGS, *extra]))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("reference log-probs"))
    return line, tmp_path / out / "reference_logps.safetensors"


def _stored(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("logps"), handle.get_tensor("covered").bool(), handle.metadata()


def test_a_longer_resumed_run_adds_only_the_missing_batches_from_the_starting_model(tmp_path, capsys):
    """18 training pairs at batch 4 (5 micro-batches), 6 held out (2). One step reads batch 0 and
    the held-out ones; resumed to 3 steps it computes batches 1 and 2 only, with the starting
    model (the checkpoint loads later), so its cache is the 3-step fresh run's, bit for bit."""
    line, cache = _dpo(tmp_path, "run", capsys, "train.max_steps=1")
    assert int(re.search(r"computed for (\d+) sequences", line).group(1)) == (4 + 6) * 2
    _, covered, meta = _stored(cache)
    assert set(meta) == {"fingerprint"} and int(covered.sum()) == 20  # one metadata key: written in a fixed order

    line, _ = _dpo(tmp_path, "run", capsys, "train.max_steps=3", "train.resume=auto")
    assert int(re.search(r"computed for (\d+) sequences", line).group(1)) == 2 * 4 * 2, line
    assert "beside the 20 it held" in line

    _, fresh = _dpo(tmp_path, "fresh", capsys, "train.max_steps=3", "train.resume=never")
    assert cache.read_bytes() == fresh.read_bytes()
    line, _ = _dpo(tmp_path, "fresh", capsys, "train.max_steps=2", "train.resume=never")
    assert line.startswith("reference log-probs: reused")


def test_a_run_past_the_first_epoch_computes_all_of_it(tmp_path, capsys):
    line, cache = _dpo(tmp_path, "run", capsys, "train.max_steps=7")
    assert int(re.search(r"computed for (\d+) sequences", line).group(1)) == 48
    values, covered, _ = _stored(cache)
    assert bool(covered.all()) and bool(torch.isfinite(values).all())


def test_items_outside_the_plan_get_no_values_and_an_old_full_cache_is_still_read(tmp_path):
    from safetensors.torch import save_file

    from posttrain.models.loading import load_model, load_tokenizer
    from posttrain.train.grouped import collate_items
    from posttrain.train.preference import _fingerprint, precompute_reference
    from tests.test_reference_cache import _items

    tokenizer, model = load_tokenizer("tiny"), load_model("tiny").eval()
    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}"])
    items = _items(tokenizer)
    cache, lines = tmp_path / "ref.safetensors", []
    precompute_reference(model, items, cfg, tokenizer.pad_token_id, cache, lines.append, plan=[items[:1]])
    assert items[0].reference_logps and not items[1].reference_logps and not items[2].reference_logps
    assert "reference_logps" not in collate_items(items[1:], tokenizer.pad_token_id)  # refused when read

    full = _items(tokenizer)
    precompute_reference(model, full, cfg, tokenizer.pad_token_id, None, lines.append)
    values = [v for item in full for v in item.reference_logps]
    save_file({"logps": torch.tensor(values)}, str(cache), metadata={"fingerprint": _fingerprint(cfg, full)})
    again = _items(tokenizer)
    precompute_reference(model, again, cfg, tokenizer.pad_token_id, cache, lines.append)
    assert lines[-1].startswith("reference log-probs: reused")
    assert [v for item in again for v in item.reference_logps] == pytest.approx(values, abs=0)

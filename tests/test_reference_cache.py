"""Review: DPO reference log-prob precompute and its on-disk cache (reference_logps.safetensors).

The cache must never be reused when the reference it stores is no longer the one this run
would compute; a corrupted/truncated file must be recomputed or reported clearly; the write
should be atomic (no half-written cache left at the final path).
"""

from __future__ import annotations

import pytest
import torch

from posttrain.config import DPOConfig
from posttrain.data.preferences import PreferenceRecord, encode_preference
from posttrain.data.templates import ALPACA, CHATML
from posttrain.models.loading import load_model, load_tokenizer, save_model
from posttrain.train.grouped import items_from_examples
from posttrain.train.preference import kto_items, precompute_reference

PAIRS = [("Smallest letter: q m t", ("m", "t"), (0, 1)), ("Copy: a b", ("a b", "b a b a"), (0, 1)),
         ("Reverse: x y z w", ("w z y x", "x y z w"), (0, 1))]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def model():
    return load_model("tiny").eval()


def _items(tokenizer, rows=PAIRS, template=CHATML, max_length=None):
    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(k), source=f"t:{i}")
               for i, (p, r, k) in enumerate(rows)]
    items = items_from_examples([encode_preference(rec, tokenizer, template) for rec in records])
    if max_length is not None:
        for item in items:
            for seq in item.sequences:
                seq.input_ids, seq.labels = seq.input_ids[:max_length], seq.labels[:max_length]
    return items


def _run(model, items, cfg, pad_id, cache, **kw):
    lines = []
    precompute_reference(model, items, cfg, pad_id, cache, lines.append, **kw)
    return lines[-1], [v for item in items for v in item.reference_logps]


def _fresh(model, items, cfg, pad_id, **kw):
    return _run(model, items, cfg, pad_id, None, **kw)[1]


# --------------------------------------------------------------------------- bugs (expected to fail)


def test_cache_is_not_reused_when_model_weights_at_the_same_path_change(tokenizer, tmp_path):
    """BUG: `_fingerprint` hashes only the model.path string (+ dtype, adapter.method,
    mixed_precision), never the weights; re-training/overwriting the model directory at the same
    path (e.g. an SFT stage re-run feeding DPO) reuses reference log-probs of the OLD weights."""
    directory = tmp_path / "model"
    first = load_model("tiny")
    save_model(first, tokenizer, directory)
    cfg = DPOConfig.load(None, [f"model.path={directory}", f"output_dir={tmp_path / 'run'}"])
    cache = tmp_path / "ref.safetensors"
    _run(load_model(str(directory)).eval(), _items(tokenizer), cfg, tokenizer.pad_token_id, cache)

    second = load_model("tiny")
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(second, tokenizer, directory)
    reloaded = load_model(str(directory)).eval()
    line, values = _run(reloaded, _items(tokenizer), cfg, tokenizer.pad_token_id, cache)
    expected = _fresh(reloaded, _items(tokenizer), cfg, tokenizer.pad_token_id)
    assert values == pytest.approx(expected, abs=1e-4), f"stale reference reused: {line}"


def test_corrupted_cache_file_is_recomputed_or_reported_clearly(model, tokenizer, tmp_path):
    """BUG: a garbage reference_logps.safetensors makes `safe_open` raise a raw SafetensorError
    (no path, no hint) instead of recomputing (precompute_reference, the safe_open call)."""
    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}"])
    cache = tmp_path / "ref.safetensors"
    cache.write_bytes(b"\x00garbage, not a safetensors file")
    try:
        line, values = _run(model, _items(tokenizer), cfg, tokenizer.pad_token_id, cache)
    except Exception as exc:  # a clear error naming the file would be acceptable
        assert str(cache) in str(exc), f"unclear error for a corrupt cache: {type(exc).__name__}: {exc}"
        return
    assert "computed" in line
    assert values == pytest.approx(_fresh(model, _items(tokenizer), cfg, tokenizer.pad_token_id), abs=1e-5)


def test_truncated_cache_file_is_recomputed_or_reported_clearly(model, tokenizer, tmp_path):
    """BUG: a cache cut short (crash/disk full mid-write: the write is not atomic) has a valid
    header with the matching fingerprint; reading the tensor then fails with a raw error."""
    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}"])
    cache = tmp_path / "ref.safetensors"
    _run(model, _items(tokenizer), cfg, tokenizer.pad_token_id, cache)
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) - 8])
    try:
        line, values = _run(model, _items(tokenizer), cfg, tokenizer.pad_token_id, cache)
    except Exception as exc:
        assert str(cache) in str(exc), f"unclear error for a truncated cache: {type(exc).__name__}: {exc}"
        return
    assert values == pytest.approx(_fresh(model, _items(tokenizer), cfg, tokenizer.pad_token_id), abs=1e-5)


def test_cache_write_is_atomic(model, tokenizer, tmp_path, monkeypatch):
    """BUG: `save_file(..., str(cache))` writes straight to the final path; an interrupted write
    leaves a partial reference_logps.safetensors that the next run tries to read."""
    import safetensors.torch as st

    real = st.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # simulate the crash: only part of the bytes landed
            handle.truncate(max(1, handle.seek(0, 2) // 2))
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", interrupted)
    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}"])
    cache = tmp_path / "ref.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _run(model, _items(tokenizer), cfg, tokenizer.pad_token_id, cache)
    assert not cache.exists(), "a partial cache file was left at the final path"


# --------------------------------------------------------------------------- coverage (expected to pass)


@pytest.mark.parametrize("change", ["max_length", "template", "kto", "fewer_items"])
def test_data_side_changes_invalidate_the_cache(change, model, tokenizer, tmp_path):
    """Token ids + labels of every sequence are hashed, so truncation, template, KTO's mismatched
    rows and eval/train membership changes all recompute."""
    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}"])
    cache = tmp_path / "ref.safetensors"
    _run(model, _items(tokenizer), cfg, tokenizer.pad_token_id, cache)
    changed = {"max_length": lambda: _items(tokenizer, max_length=12),
               "template": lambda: _items(tokenizer, template=ALPACA),
               "kto": lambda: kto_items(_items(tokenizer), 512, lambda *_: None),
               "fewer_items": lambda: _items(tokenizer, PAIRS[:2])}[change]()
    line, values = _run(model, changed, cfg, tokenizer.pad_token_id, cache)
    assert "computed" in line
    assert values == pytest.approx(_fresh(model, changed, cfg, tokenizer.pad_token_id), abs=1e-5)


@pytest.mark.parametrize("override", ["model.dtype=bfloat16", "train.mixed_precision=bf16", "adapter.method=lora",
                                      "model.path=tiny-2l"])
def test_model_side_config_changes_invalidate_the_cache(override, model, tokenizer, tmp_path):
    cache = tmp_path / "ref.safetensors"
    base = DPOConfig.load(None, [f"output_dir={tmp_path}"])
    _run(model, _items(tokenizer), base, tokenizer.pad_token_id, cache)
    other = DPOConfig.load(None, [f"output_dir={tmp_path}", override])
    line, _ = _run(model, _items(tokenizer), other, tokenizer.pad_token_id, cache)
    assert "computed" in line


def test_reordered_items_get_their_own_values(model, tokenizer, tmp_path):
    """The key is order-sensitive and values are assigned by position: a reordering recomputes,
    and each item still gets its own content's log-probs."""
    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}"])
    cache = tmp_path / "ref.safetensors"
    items = _items(tokenizer)
    _run(model, items, cfg, tokenizer.pad_token_id, cache)
    by_source = {item.source: item.reference_logps for item in items}
    shuffled = _items(tokenizer)[::-1]
    line, _ = _run(model, shuffled, cfg, tokenizer.pad_token_id, cache)
    assert "computed" in line
    for item in shuffled:
        assert item.reference_logps == pytest.approx(by_source[item.source], abs=1e-5)


@pytest.mark.parametrize("unpadded", [False, True])
def test_share_prompt_layout_gives_the_same_values_so_reuse_is_safe(unpadded, model, tokenizer, tmp_path):
    """share_prompt / model.padding_free are not in the key; reuse across them is fine only
    because the layouts give the same log-probs (checked here)."""
    from posttrain.models.attention import padding_free

    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}"])
    plain = _fresh(model, _items(tokenizer), cfg, tokenizer.pad_token_id)
    other = load_model("tiny").eval()
    assert padding_free(other, unpadded) == unpadded
    shared = _fresh(other, _items(tokenizer), cfg, tokenizer.pad_token_id, share_prompt=True, unpadded=unpadded)
    assert shared == pytest.approx(plain, abs=1e-4)


def test_reuse_returns_identical_values(model, tokenizer, tmp_path):
    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}"])
    cache = tmp_path / "ref.safetensors"
    _, first = _run(model, _items(tokenizer), cfg, tokenizer.pad_token_id, cache)
    line, second = _run(model, _items(tokenizer), cfg, tokenizer.pad_token_id, cache)
    assert "reused" in line and first == second


def test_run_dpo_reuses_a_stale_cache_after_the_model_directory_is_overwritten(tokenizer, tmp_path, capsys):
    """BUG (end to end): two run_dpo calls in one output_dir with model.path=<dir>; the dir's
    weights change in between, yet the second run logs 'reference log-probs: reused'."""
    from posttrain.train.preference import run_dpo

    directory = tmp_path / "model"
    save_model(load_model("tiny"), tokenizer, directory)
    args = [f"output_dir={tmp_path / 'run'}", f"model.path={directory}", "data.synthetic_size=24",
            "data.eval_fraction=0.2", "data.max_length=48", "train.batch_size=4", "train.max_steps=1",
            "train.progress_bar=false", "train.resume=never", "eval.exact_match_prompts=0"]
    run_dpo(DPOConfig.load(None, args))
    assert (tmp_path / "run" / "reference_logps.safetensors").is_file()
    changed = load_model("tiny")
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(changed, tokenizer, directory)
    capsys.readouterr()
    run_dpo(DPOConfig.load(None, args))
    out = capsys.readouterr().out
    assert "reference log-probs: reused" not in out


def test_several_processes_each_compute_every_worlds_micro_batch_and_share_them(model, tokenizer, tmp_path, monkeypatch):
    """Process 1 of 2 computes micro-batches 1, 3, ... of the plan, receives the others from process
    0 (accelerate's gather_object, here standing in for the exchange), and ends with every value a
    single process computes, bitwise; only process 0 writes the cache."""
    import accelerate.utils

    import posttrain.train.preference as pref

    cfg = DPOConfig.load(None, ["model.path=tiny", f"output_dir={tmp_path / 'run'}"])
    rows = PAIRS * 3
    plan_of = lambda items: [items[i : i + 2] for i in range(0, len(items), 2)]  # 5 micro-batches of 9 items
    alone = _items(tokenizer, rows)
    precompute_reference(model, alone, cfg, tokenizer.pad_token_id, None, lambda *_: None, plan=plan_of(alone))
    expected = [item.reference_logps for item in alone]

    computed_batches = []
    real = pref.batch_logps
    monkeypatch.setattr(pref, "batch_logps", lambda m, batch, *a: computed_batches.append(1) or real(m, batch, *a))

    def exchange(objects):  # what process 0 sends: its micro-batches 0, 2, 4, as a single process computed them
        if objects[0] is True or objects[0] is False:
            return [False, objects[0]]
        return [{i: [v for item in plan_of(alone)[i] for v in item.reference_logps] for i in (0, 2, 4)}, objects[0]]

    monkeypatch.setattr(accelerate.utils, "gather_object", exchange)
    mine = _items(tokenizer, rows)
    cache = tmp_path / "ref.safetensors"
    precompute_reference(model, mine, cfg, tokenizer.pad_token_id, cache, lambda *_: None, plan=plan_of(mine),
                         rank=1, world=2)
    assert len(computed_batches) == 2  # micro-batches 1 and 3
    assert [item.reference_logps for item in mine] == expected
    assert not cache.exists()

"""A walk of the DPO family's reference model and its cache, as a user iterating on a DPO run.

Walked: README's DPO section on the reference (the starting model; `dpo.reference: precompute`
computes its log-probs once "in the very batches the run reads ... so π = π_ref holds to the bit at
step 0" and caches them in `reference_logps.safetensors`, reused while model and data match; `live`
runs the base with adapters off, or a frozen copy under full fine-tuning) and `train/preference.py`
(`_fingerprint`, `_cached`, `precompute_reference`, `reference_plan`, `PreferenceLoss`). One run
directory, rerun again and again with one thing changed: rows edited, a file added, max_length, the
template, the model at model.path rewritten, dtype, the adapter method, padding_free / share_prompt,
batch size and seed, LoRA and full, DPO and KTO; then `dpo.reference=live` against precompute, a merged
LoRA SFT as the start, and damaged cache files.

What was right: the cache lives in its own run directory only (another directory with the same config
computes its own); it is plain safetensors (two tensors and the key in its metadata, no pickle); every
data-side change (rows, files, max_length, template, KTO's mismatched rows) and every model-side one
(the files at model.path, dtype, precision, adapter method) recomputes it; a damaged or truncated file is
said and recomputed; a rerun of the same config reuses it and takes a first step identical to the first
run's, with π = π_ref exactly (accuracy one half, every reward 0); a changed batch size or seed reuses
what the new plan reads or computes what it lacks, still exact at step 0 on the tiny preset; live and
precompute agree at step 0 for full fine-tuning and LoRA, and a merged LoRA SFT is the reference (the
existing tests in test_reference_cache.py, test_reference_adapters.py, test_preference_stages.py,
test_s30_scale.py and test_walkthrough_continuing.py hold most of this). What was wrong: the cache's key
leaves out the batch layout its values were computed in (`model.padding_free`, `dpo.share_prompt`), so a
rerun with either switched reuses log-probs from the other layout, and step 0 counts the sign of their
rounding noise: rewards/accuracy 43.75% on the first training step instead of 50%, the very thing README
says the precomputation in the run's own batches prevents.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 33:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

BASE = ["data.synthetic_size=40", "data.eval_fraction=0.2", "data.max_length=48", "train.batch_size=8",
        "train.max_steps=1", "train.progress_bar=false", "train.resume=never", "eval.exact_match_prompts=0"]
CACHE = "reference_logps.safetensors"


def _dpo(capsys, out: Path, *extra: str) -> tuple[list[str], dict]:
    """One 1-step DPO run in `out`: (its 'reference log-probs' lines, its first training step's record)."""
    from posttrain.config import DPOConfig
    from posttrain.train.preference import run_dpo

    capsys.readouterr()
    run_dpo(DPOConfig.load(None, [f"output_dir={out}", *BASE, *extra]))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("reference log-probs")]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return said, next(r for r in records if "loss" in r and "eval_loss" not in r)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("switch", ["model.padding_free=false", "dpo.share_prompt=false"])
def test_a_rerun_with_the_layout_switched_still_starts_at_pi_equal_pi_ref_to_the_bit(capsys, tmp_path, switch,
                                                                                      method):
    """README: the reference log-probs are computed "in the very batches the run reads ..., so π = π_ref
    holds to the bit at step 0 (a sequence's log-prob otherwise moves in its last bits with the batch around
    it, and accuracy at step 0 would count the sign of that noise)". The cache is keyed on the model and the
    tokens (`_fingerprint`), not on the layout `precompute_reference` computed them in (shared-prompt rows,
    padding-free packing). Run once with the defaults, then rerun the same directory with padding-free rows
    or shared prompts switched off (to compare speed or memory, say): the cache is "reused", the policy's
    log-probs come from the new layout and the reference's from the old, and step 0 logs rewards/accuracy
    0.4375 and margins of -1.2e-8 instead of 0.5 and 0 (a fresh directory with the same switch: 0.5 and 0).
    The fix: key the cache on the layout too (`_fingerprint` given run_dpo's effective `share` and
    `unpadded`), or store per micro-batch the layout its values were computed in and count only those as
    covered."""
    adapter = f"adapter.method={method}"
    said, first = _dpo(capsys, tmp_path, adapter)
    assert first["rewards/accuracy"] == 0.5 and first["rewards/margins"] == 0.0, first  # the defaults: exact
    said, step = _dpo(capsys, tmp_path, adapter, switch)
    figures = {k: step[k] for k in ("rewards/accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected")}
    assert figures == {"rewards/accuracy": 0.5, "rewards/margins": 0.0, "rewards/chosen": 0.0,
                       "rewards/rejected": 0.0}, f"step 0 after {switch} ({said}): {figures}"
    assert any("was computed for another model, data or batch layout" in line for line in said), said


def test_a_cache_is_read_from_its_own_run_directory_only_and_a_rerun_there_repeats_the_first_step(capsys,
                                                                                                 tmp_path):
    """Two run directories with one config: the second computes its own cache (never the first's); a rerun
    of the first reuses its cache, leaves the file as it was, and takes the very first step of its first
    run (loss log 2, every reward 0, the same gradient norm to the bit). The cache is plain safetensors:
    an 8-byte header length, a JSON header naming two tensors (float32 log-probs, the uint8 `covered`
    mask) and the key in its metadata; nothing that unpickles."""
    a, b = tmp_path / "a", tmp_path / "b"
    said_a, first = _dpo(capsys, a)
    stored = (a / CACHE).read_bytes()
    said_b, other = _dpo(capsys, b)
    assert len(said_b) == 1 and said_b[0].startswith("reference log-probs: computed") and str(b / CACHE) in said_b[0], \
        said_b
    said, again = _dpo(capsys, a)
    assert len(said) == 1 and said[0].startswith("reference log-probs: reused") and str(a / CACHE) in said[0], said
    assert (a / CACHE).read_bytes() == stored
    keys = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/accuracy", "rewards/margins")
    assert {k: again[k] for k in keys} == {k: first[k] for k in keys} == {k: other[k] for k in keys}
    assert first["rewards/accuracy"] == 0.5 and first["rewards/margins"] == 0.0

    size = struct.unpack("<Q", stored[:8])[0]
    header = json.loads(stored[8 : 8 + size])
    assert sorted(header) == ["__metadata__", "covered", "logps"]
    assert (header["logps"]["dtype"], header["covered"]["dtype"]) == ("F32", "U8")
    assert list(header["__metadata__"]) == ["fingerprint"]

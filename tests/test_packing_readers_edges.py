"""Review tests: SFT packing / batching against examples run alone, and the file readers' edges.

Expectations are independent of posttrain's helpers: token ids and assistant masks come from
the tiny tokenizer's own chat template (`apply_chat_template(return_assistant_tokens_mask=True)`,
its template has `{% generation %}` tags), losses and gradients from plain transformers forwards
of each example ALONE in float64, line numbers from counting the bytes of the file we wrote.
"""

from __future__ import annotations

import copy
import csv
import gzip
import io
import json
import zlib

import pytest
import torch

from posttrain.data.records import IGNORE_INDEX, Example
from posttrain.errors import DataError

WORDS = ["cat", "dog", "the", "is", "here", "a", "b", "c", "smallest", "copy"]


def _quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    return AutoTokenizer.from_pretrained(preset_path("tiny"))


def _rows(n=8):
    """Alpaca rows of varied lengths (short prompt, output of k words)."""
    return [{"instruction": f"say {WORDS[k % len(WORDS)]}", "output": " ".join([WORDS[(k * 3) % len(WORDS)]] * (k + 1))}
            for k in range(n)]


def _reference(tok, row):
    """(input_ids, labels) of an alpaca row, from the tokenizer's own template and generation mask."""
    messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]


def _alone_loss_sum(model, ids, labels):
    """Σ −log p(label_t | tokens_<t) over labelled t ≥ 1 for one example run alone (float64 model)."""
    input_ids = torch.tensor([ids])
    logits = model(input_ids=input_ids, use_cache=False).logits[0].double()
    targets = torch.tensor(labels[1:])
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:-1], -1)
    return -logp[keep].gather(-1, targets[keep].unsqueeze(-1)).sum()


# --------------------------------------------------------------------------- packing: numbers


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("loss_kind", ["chunked", "plain"])
def test_packed_loss_logps_and_grads_equal_each_example_alone_float64(tok, attn, loss_kind):
    """pack → collate_packed → CausalLMLoss on a float64 model: the summed loss, every per-token
    log-prob (plain transformers forward on the collated tensors) and every gradient equal
    those of each example run alone."""
    from transformers import AutoModelForCausalLM

    from posttrain.data.batching import collate_packed, pack
    from posttrain.models.presets import preset_path
    from posttrain.train.sft import CausalLMLoss

    refs = [_reference(tok, row) for row in _rows(7)]
    refs.append((list(range(10, 31)), list(range(10, 31))))  # a text example: loss on every token
    examples = [Example(ids, labels, f"r:{i}") for i, (ids, labels) in enumerate(refs)]
    rows = pack(examples, 64)
    assert len(rows) < len(examples) and any(r.position_ids.count(0) > 1 for r in rows)
    batch = collate_packed(rows, tok.pad_token_id)

    model = AutoModelForCausalLM.from_pretrained(preset_path("tiny-2l"), dtype=torch.float64, attn_implementation=attn)
    model.eval()
    reference = copy.deepcopy(model)

    loss = CausalLMLoss(model, loss=loss_kind, chunk_size=5)(**batch)
    loss.backward()
    expected = sum(_alone_loss_sum(reference, ids, labels) for ids, labels in refs)
    expected.backward()
    tol = 1e-12 if attn == "sdpa" else 1e-6  # eager takes its softmax in float32
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=tol)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=tol * 10, atol=tol * 10, msg=name)

    # per-token log-probs of every segment of every packed row, through a plain forward
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, (ids, labels) in enumerate(refs):
            alone = torch.log_softmax(reference(input_ids=torch.tensor([ids]), use_cache=False).logits[0], -1)
            hits = [(b, s) for b in range(len(rows)) for s in range(batch["input_ids"].shape[1] - len(ids) + 1)
                    if batch["input_ids"][b, s:s + len(ids)].tolist() == ids and batch["position_ids"][b, s] == 0]
            assert len(hits) == 1, "each example sits in exactly one packed segment"
            b, s = hits[0]
            packed = torch.log_softmax(logits[b, s:s + len(ids)], -1)
            torch.testing.assert_close(packed, alone, rtol=tol * 10, atol=tol * 10)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(tmp_path, name, model_path, train_file, *, packing, batch_size=8, grad_accum=1, max_length=64):
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    cfg = SFTConfig.from_dict({
        "output_dir": str(tmp_path / name), "model": {"path": model_path},
        "data": {"train_files": [str(train_file)], "eval_fraction": 0.0, "max_length": max_length, "packing": packing},
        "train": {"max_steps": 1, "batch_size": batch_size, "grad_accum": grad_accum, "lr": 1e-3,
                  "progress_bar": False, "resume": "never", "max_grad_norm": 0},
        "eval": {"exact_match_prompts": 0}})
    run_dir = run_sft(cfg)
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def _per_token_mean_and_grad_norm(model_dir, refs):
    """The README's step loss (Σ token losses / Σ trained tokens of the whole step), float64, and
    the 2-norm of its gradient over all parameters, every example run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.eval()  # the configs below have no dropout; eval only fixes the mode
    total = sum(_alone_loss_sum(model, ids, labels) for ids, labels in refs)
    count = sum(sum(1 for t in labels[1:] if t != IGNORE_INDEX) for _, labels in refs)
    (total / count).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(total.detach()) / count, float(norm)


def test_step_loss_is_the_per_token_mean_packed_or_not_and_across_micro_batches(tok, tmp_path):
    """One optimizer step over the whole data: unpacked (one micro-batch), packed (one
    micro-batch), and packed with one row per micro-batch accumulated: each logs the per-token
    mean over the step and the gradient norm of that mean."""
    from posttrain.data.batching import pack
    from posttrain.models.presets import preset_path

    rows = _rows(8)
    refs = [_reference(tok, row) for row in rows]
    data = _write_jsonl(tmp_path / "t.jsonl", rows)
    want_loss, want_norm = _per_token_mean_and_grad_norm(preset_path("tiny-2l"), refs)
    n_rows = len(pack([Example(i, l) for i, l in refs], 64))  # only to size grad_accum to one pass
    assert 1 < n_rows < len(rows)
    for name, kwargs in [("unpacked", {"packing": False}), ("packed", {"packing": True}),
                         ("packed_accum", {"packing": True, "batch_size": 1, "grad_accum": n_rows})]:
        got = _sft(tmp_path, name, "tiny-2l", data, **kwargs)
        assert got["loss"] == pytest.approx(want_loss, rel=1e-5), name
        assert got["grad_norm"] == pytest.approx(want_norm, rel=1e-4), name


def _tiny_arch_dir(tmp_path, tok, arch):
    """A random-init 2-layer model of another architecture, no dropout, saved with the tiny tokenizer."""
    import transformers

    torch.manual_seed(0)
    common = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": 0, "eos_token_id": 0,
              "initializer_range": 0.3}
    if arch == "opt":
        config = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                        word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.0,
                                        attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, **common)
    elif arch == "bloom":
        config = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                                          attention_dropout=0.0, **common)
    else:
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, **common)
    model = transformers.AutoModelForCausalLM.from_config(config)
    out = tmp_path / arch
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bloom"])
def test_packed_sft_step_equals_examples_alone_on_other_architectures(tok, tmp_path, arch):
    """README: "packing — several examples per row with per-sequence position ids and no attention
    across them (packed loss = unpacked loss within 1e-5)". A local model directory of any causal
    LM is accepted, so packing must be exact or refused: GPT-2's mask comes from the position ids
    (exact); OPT's and Bloom's do not (they attended across examples, silently: now refused)."""
    from posttrain.errors import ConfigError

    rows = _rows(8)
    refs = [_reference(tok, row) for row in rows]
    model_dir = _tiny_arch_dir(tmp_path, tok, arch)
    data = _write_jsonl(tmp_path / "t.jsonl", rows)
    want_loss, _ = _per_token_mean_and_grad_norm(model_dir, refs)
    unpacked = _sft(tmp_path, "u", str(model_dir), data, packing=False)
    assert unpacked["loss"] == pytest.approx(want_loss, rel=1e-5)  # the control: padding is exact
    if arch == "gpt2":
        packed = _sft(tmp_path, "p", str(model_dir), data, packing=True)
        assert packed["loss"] == pytest.approx(want_loss, rel=1e-5)
    else:
        with pytest.raises(ConfigError, match="data.packing"):
            _sft(tmp_path, "p", str(model_dir), data, packing=True)


# --------------------------------------------------------------------------- packing: bookkeeping


@pytest.mark.parametrize("group_by_length", [False, True])
def test_packed_epochs_hold_every_truncated_example_once_and_labels_stay_inside(tok, tmp_path, group_by_length):
    """prepare_sft_data (truncation to max_length) → pack → SFTStage.micro_batches, two epochs:
    every example appears exactly once per epoch as one whole segment equal to the tokenizer's
    ids[:max_length], rows never exceed max_length, each segment's first token carries no label
    (nothing is trained to follow the previous example), the rest are the example's own labels,
    and the loop's normaliser (`weight`) equals the independent count of trained tokens."""
    from posttrain.config import SFTConfig
    from posttrain.data.batching import pack
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.train.sft import SFTStage

    max_length = 40
    rows = _rows(24)
    refs = [_reference(tok, row) for row in rows]
    assert any(len(ids) > max_length for ids, _ in refs) and any(len(ids) <= max_length // 2 for ids, _ in refs)
    expected = sorted((ids[:max_length], labels[:max_length]) for ids, labels in refs)
    trained = sum(sum(1 for t in labels[1:] if t != IGNORE_INDEX) for _, labels in expected)
    data = _write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = SFTConfig.from_dict({"output_dir": str(tmp_path / "run"),
                               "data": {"train_files": [str(data)], "eval_fraction": 0.0, "max_length": max_length,
                                        "packing": True, "group_by_length": group_by_length},
                               "train": {"batch_size": 2, "seed": 3}})
    prepared = prepare_sft_data(cfg.data, tok, tmp_path / "run", seed=3, log=_quiet)
    packed = pack(prepared.train, max_length)
    assert len(packed) < len(prepared.train)
    stage = SFTStage(None, packed, [], cfg, tok.pad_token_id)
    orders = []
    for epoch in (0, 1):
        segments, weight, order = [], 0.0, []
        for batch in stage.micro_batches(epoch):
            assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= max_length
            weight += stage.weight(batch)
            ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
            for r in range(ids.shape[0]):
                starts = [i for i in range(ids.shape[1]) if pos[r, i] == 0] + [ids.shape[1]]
                for s, e in zip(starts, starts[1:]):
                    seg = ids[r, s:e].tolist()
                    if all(t == tok.pad_token_id for t in seg):
                        assert (labels[r, s:e] == IGNORE_INDEX).all()
                        continue
                    assert pos[r, s:e].tolist() == list(range(e - s))
                    assert labels[r, s] == IGNORE_INDEX
                    segments.append((seg, labels[r, s:e].tolist()))
                    order.append(tuple(seg))
        got = sorted((seg, lab) for seg, lab in segments)
        assert [s for s, _ in got] == [i for i, _ in expected]
        assert [lab[1:] for _, lab in got] == [lab[1:] for _, lab in expected]
        assert weight == trained
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled per epoch
    again = [tuple(b["input_ids"].flatten().tolist()) for b in SFTStage(None, packed, [], cfg, tok.pad_token_id).micro_batches(1)]
    assert again == [tuple(b["input_ids"].flatten().tolist()) for b in stage.micro_batches(1)]


# --------------------------------------------------------------------------- readers


def _lines_of(data: bytes) -> list[bytes]:
    """Physical lines as an editor numbers them (split on \\n only)."""
    return data.split(b"\n")


def test_jsonl_locations_are_physical_lines_with_bom_crlf_blanks_and_no_final_newline(tmp_path):
    from posttrain.data.readers import Malformed, iter_rows

    data = (b'\xef\xbb\xbf{"text": "a"}\r\n\r\n   \r\n{"text": "b"}\r\n[1]\r\n{"text": \r\n'
            b'{"text": "c\\nd"}\r\n\n{"text": "e"}')
    path = tmp_path / "x.jsonl"
    path.write_bytes(data)
    expected = []
    for number, line in enumerate(_lines_of(data), 1):
        line = line.removeprefix(b"\xef\xbb\xbf").strip()
        if line:
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            expected.append((f"{path}:{number}", value if isinstance(value, dict) else "bad"))
    got = [(loc, "bad" if isinstance(row, Malformed) else row) for loc, row in iter_rows(str(path))]
    assert got == expected


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_truncated_gz_yields_every_complete_line_then_stops_at_the_first_missing_one(tmp_path, kind):
    """A .gz cut short: every line that decompresses whole comes out (none half-read), then a
    DataError names the first line that could not be read. Counted with zlib, independently."""
    from posttrain.data.readers import iter_rows

    if kind == "jsonl":
        text = "".join(json.dumps({"text": f"row {i} " + "x" * (i % 37)}) + "\n" for i in range(3000))
    else:
        text = "text\n" + "".join(f"row {i} {'y' * (i % 41)}\n" for i in range(3000))
    blob = gzip.compress(text.encode())
    cut = blob[: len(blob) // 2]
    path = tmp_path / f"t.{kind}.gz"
    path.write_bytes(cut)
    recovered = zlib.decompressobj(wbits=31).decompress(cut)
    complete = recovered[: recovered.rfind(b"\n") + 1].decode().splitlines()
    if kind == "csv":
        expected_rows = [{"text": line} for line in complete[1:]]
        first_line = 2
    else:
        expected_rows = [json.loads(line) for line in complete]
        first_line = 1
    got = []
    with pytest.raises(DataError) as info:
        for location, row in iter_rows(str(path)):
            got.append((location, row))
    assert [row for _, row in got] == expected_rows
    assert [loc for loc, _ in got] == [f"{path}:{first_line + i}" for i in range(len(expected_rows))]
    assert f"{path}:{len(complete) + 1}:" in str(info.value)


def test_csv_quoted_newlines_crlf_blank_lines_and_empty_required_cell(tmp_path):
    """Locations are the physical line each record starts on (counted by a regex-free scan of
    the bytes); an empty required cell is a reported bad row, not a silent skip."""
    from posttrain.data.formats import load_records

    records_in = [("q1", "one"), ("q2", "two\r\nlines"), ("q3", ""), ("q4", "4 \"quoted\" ,comma")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(["instruction", "output"])
    starts = []
    for i, rec in enumerate(records_in):
        if i == 2:
            buf.write("\r\n")  # a blank line between records
        starts.append(buf.getvalue().count("\n") + 1)
        writer.writerow(rec)
    path = tmp_path / "x.csv"
    path.write_bytes(buf.getvalue().encode())
    with pytest.raises(DataError) as info:
        load_records([str(path)], log=_quiet)
    assert f"{path}:{starts[2]}: 'output' is empty" in str(info.value)
    records, report = load_records([str(path)], bad_rows="skip", max_bad_fraction=0.5,
                                   rejects_path=str(tmp_path / "rej.jsonl"), log=_quiet)
    good = [i for i, rec in enumerate(records_in) if rec[1]]
    assert [r.source for r in records] == [f"{path}:{starts[i]}" for i in good]
    assert [r.messages[-1]["content"] for r in records] == [records_in[i][1] for i in good]
    assert (report.total, report.bad) == (4, 1)


def test_csv_unclosed_quote_does_not_silently_swallow_the_rest_of_the_file(tmp_path):
    """A stray opening quote in the last column: Python's csv (non-strict) reads to the end of the
    file inside the quotes, so rows 3.. become part of row 2's output. The README promises "No
    row is dropped unannounced"; either the file is an error or all 4 data lines are counted."""
    from posttrain.data.formats import load_records

    path = tmp_path / "x.csv"
    path.write_text('instruction,output\nq1,"a1\nq2,a2\nq3,a3\nq4,a4\n')
    try:
        records, report = load_records([str(path)], bad_rows="skip", max_bad_fraction=1.0, log=_quiet)
    except DataError:
        return
    assert report.total == 4, [r.messages for r in records]


def test_csv_header_error_names_the_header_line(tmp_path):
    from posttrain.data.readers import iter_rows

    path = tmp_path / "x.csv"
    path.write_text("\n\ninstruction,instruction\nq,a\n")  # blank lines are skipped; the header is line 3
    with pytest.raises(DataError, match=rf"{path}:3:"):
        list(iter_rows(str(path)))


def test_parquet_nested_messages_and_datasets_dict_directory(tmp_path):
    """list<struct<role, content>> columns over several row groups, and a save_to_disk
    DatasetDict (its train split), come out as the same turns, every row numbered."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data.formats import load_records

    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(7)]
    pq.write_table(pa.table({"messages": convs, "id": list(range(7))}), tmp_path / "m.parquet", row_group_size=3)
    records, _ = load_records([str(tmp_path / "m.parquet")], log=_quiet)
    assert [r.messages for r in records] == convs
    assert [r.source for r in records] == [f"{tmp_path / 'm.parquet'}:row {i}" for i in range(1, 8)]
    train = datasets.Dataset.from_dict({"messages": convs})
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "dd"))
    records, _ = load_records([str(tmp_path / "dd")], log=_quiet)
    assert [r.messages for r in records] == convs


def test_json_array_lines_and_object_of_columns_is_a_clear_error(tmp_path):
    from posttrain.data.readers import Malformed, iter_rows

    data = b'\xef\xbb\xbf[\r\n {"text": "a"},\r\n\r\n {"text": "b"}, {"text": "c"},\r\n 5\r\n]'
    path = tmp_path / "a.json"
    path.write_bytes(data)
    got = [(loc, "bad" if isinstance(row, Malformed) else row["text"]) for loc, row in iter_rows(str(path))]
    line_of = {b'"a"': 2, b'"b"': 4, b'"c"': 4, b"5": 5}
    for needle, number in line_of.items():  # independent: which physical line holds each value
        assert needle in _lines_of(data)[number - 1]
    assert got == [(f"{path}:2", "a"), (f"{path}:4", "b"), (f"{path}:4", "c"), (f"{path}:5", "bad")]
    columns = tmp_path / "c.json"
    columns.write_text(json.dumps({"instruction": ["a", "b"], "output": ["x", "y"]}))
    with pytest.raises(DataError, match="exactly one list-valued key"):
        list(iter_rows(str(columns)))

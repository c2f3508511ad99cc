"""Review tests: generation (greedy, sampling, stopping) and the exact-match evaluation behind the
demo's figures, against independent references: transformers' own `generate` and logits warpers,
a hand-written greedy loop with no KV cache, float64 formulas, and each synthetic task's answer
written out again here. Tiny preset with its weights redrawn (seeded) so that its outputs vary."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch

transformers = pytest.importorskip("transformers")

from posttrain.data import synthetic  # noqa: E402
from posttrain.data.records import Record  # noqa: E402
from posttrain.rollout.generate import generate, generate_token_ids  # noqa: E402
from posttrain.rollout.sampling import SamplingSettings, sample_next  # noqa: E402

USERS = ["Copy: a b", "Smallest letter: q m t z", "Hello there, how are you today? Tell me about it", "Hi",
         "Reverse: k l m n o p", "What is two plus three?"]


def chatml(user: str) -> str:
    """The tiny preset's ChatML, written out by hand."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.presets import preset_path

    model = AutoModelForCausalLM.from_pretrained(preset_path("tiny"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(preset_path("tiny"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random-init tiny only emits newlines: redraw at a larger scale
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    return model, tok


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def no_cache_greedy(model, prompt_ids: list[int], max_new: int, eos: set[int], *, rep: float = 1.0,
                    freq: float = 0.0, pres: float = 0.0) -> list[int]:
    """One prompt alone, the whole sequence re-run every step (no KV cache, no padding), argmax of
    the float64 logits after the penalties written out (CTRL repetition, OpenAI frequency/presence)."""
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new):
            z = model(torch.tensor([ids])).logits[0, -1].double()
            if rep != 1.0:
                for v in set(ids):
                    z[v] = z[v] / rep if z[v] > 0 else z[v] * rep
            for v in set(out):
                z[v] -= freq * out.count(v) + pres
            token = int(torch.argmax(z))
            out.append(token)
            ids.append(token)
            if token in eos:
                break
    return out


def ours_ids(model, tok, prompts, settings, eos, batch_size=8, **kw):
    return generate_token_ids(model, [ids_of(tok, p) for p in prompts], settings, pad_token_id=tok.pad_token_id,
                              eos_token_ids=eos, batch_size=batch_size, **kw)


# ---------------------------------------------------------------- greedy: batch = alone = no cache = transformers


def test_greedy_left_padded_batches_equal_no_cache_loop_and_transformers(tiny):
    model, tok = tiny
    prompts = [chatml(u) for u in USERS]
    free = ours_ids(model, tok, prompts, SamplingSettings(max_new_tokens=10, temperature=0.0), set())
    assert len({len(ids_of(tok, p)) for p in prompts}) == len(prompts)  # every row padded differently
    assert all(len(r) == 10 for r in free)
    # An "EOS" the rows reach at different steps: finished rows must stay masked while others go on.
    eos = {tok.eos_token_id, free[1][3], free[4][6]}
    reference = [no_cache_greedy(model, ids_of(tok, p), 10, eos) for p in prompts]
    assert sorted(len(r) for r in reference)[0] < 10 == max(len(r) for r in reference)
    for batch_size in (1, 4, 8):
        assert ours_ids(model, tok, prompts, SamplingSettings(max_new_tokens=10, temperature=0.0), eos,
                        batch_size=batch_size) == reference
    with torch.no_grad():
        for p, want in zip(prompts, reference):
            x = torch.tensor([ids_of(tok, p)])
            hf = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=10,
                                eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id)[0, x.shape[1]:].tolist()
            cut = next((i + 1 for i, t in enumerate(hf) if t in eos), len(hf))
            assert hf[:cut] == want


def test_greedy_repetition_penalty_equals_transformers_and_padding_is_not_seen(tiny):
    """transformers' RepetitionPenaltyLogitsProcessor counts every id of input_ids, so it is only a reference
    for rows without padding: the batched call must equal each prompt alone (pads never penalised)."""
    model, tok = tiny
    prompts = [chatml(u) for u in USERS[:4]]
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.8)
    batched = ours_ids(model, tok, prompts, settings, set(), batch_size=4)
    plain = ours_ids(model, tok, prompts, SamplingSettings(max_new_tokens=12, temperature=0.0), set())
    assert batched != plain  # the penalty changes something
    with torch.no_grad():
        for p, got in zip(prompts, batched):
            assert got == no_cache_greedy(model, ids_of(tok, p), 12, set(), rep=1.8)
            x = torch.tensor([ids_of(tok, p)])
            hf = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                                repetition_penalty=1.8, eos_token_id=None, pad_token_id=tok.pad_token_id)
            assert hf[0, x.shape[1]:].tolist() == got


def test_greedy_frequency_and_presence_penalties_equal_the_openai_formula(tiny):
    model, tok = tiny
    prompts = [chatml(u) for u in USERS[:4]]
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0, frequency_penalty=0.7, presence_penalty=0.4)
    got = ours_ids(model, tok, prompts, settings, set(), batch_size=3)
    assert got == [no_cache_greedy(model, ids_of(tok, p), 12, set(), freq=0.7, pres=0.4) for p in prompts]


# ---------------------------------------------------------------- sampling


def _formula(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(top_p(top_k(z / T))) in float64, written out: top-k keeps values >= the k-th largest,
    top-p keeps (in descending order) each token whose preceding mass is < p."""
    z = logits.double() / temperature
    if 0 < top_k < z.numel():
        z = torch.where(z >= torch.sort(z, descending=True).values[top_k - 1], z, torch.tensor(-math.inf, dtype=z.dtype))
    probs = torch.softmax(z, -1)
    if top_p < 1.0:
        order = torch.argsort(probs, descending=True)
        before, keep = 0.0, torch.zeros_like(probs, dtype=torch.bool)
        for v in order.tolist():
            if before >= top_p and keep.any():
                break
            keep[v] = True
            before += float(probs[v])
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum()


def _close_to(counts: torch.Tensor, probs: torch.Tensor, draws: int) -> None:
    """No draw outside the support; every token of expected count >= 40 (the rest pooled in one bin)
    within 5 standard errors, and Pearson's chi-square over those bins below df + 6·sqrt(2·df)."""
    assert counts[probs == 0].sum() == 0, "a token outside the filtered support was drawn"
    big = probs * draws >= 40
    observed = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    expected = torch.cat([probs[big], probs[~big].sum().reshape(1)]) * draws
    observed, expected = observed[expected > 0], expected[expected > 0]
    for o, e in zip(observed.tolist(), expected.tolist()):
        p = e / draws
        assert abs(o - e) / draws <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-9, (o, e)
    chi2, df = float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1
    assert chi2 < df + 6 * math.sqrt(2 * max(df, 1)), (chi2, df)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.6, 0, 1.0), (1.3, 25, 0.9)])
def test_first_sampled_token_of_generate_follows_the_filtered_softmax(tiny, temperature, top_k, top_p):
    """10,000 copies of one short prompt, one new token each: the frequencies are those of the formula
    applied to the model's own next-token logits (one unpadded forward, float64)."""
    model, tok = tiny
    prompt = ids_of(tok, "Tell me")
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    probs = _formula(logits, temperature, top_k, top_p)
    draws = 10_000
    settings = SamplingSettings(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    out = generate_token_ids(model, [prompt] * draws, settings, pad_token_id=tok.pad_token_id, eos_token_ids=set(),
                             batch_size=draws)
    counts = torch.bincount(torch.tensor([r[0] for r in out]), minlength=logits.numel()).double()
    _close_to(counts, probs, draws)


def _penalised(logits: torch.Tensor, prompt: list[int], generated: list[int], rep: float, freq: float,
               pres: float) -> torch.Tensor:
    z = logits.double().clone()
    for v in set(prompt) | set(generated):
        z[v] = z[v] / rep if z[v] > 0 else z[v] * rep
    for v in set(generated):
        z[v] -= freq * generated.count(v) + pres
    return z


def test_second_sampled_token_with_penalties_under_left_padding_follows_the_formula(tiny):
    """Two prompts of different lengths, 6,000 copies each in ONE batch (so one is left-padded), two new
    tokens: for each prompt, the first token and the second given the most frequent first token is distributed as the
    formula on an unpadded, uncached forward of prompt + that token, after the penalties written out."""
    model, tok = tiny
    prompts = [ids_of(tok, "Tell me"), ids_of(tok, "Please write a short poem about the sea")]
    assert len(prompts[0]) < len(prompts[1])
    copies, rep, freq, pres, temperature = 6_000, 1.3, 0.5, 0.3, 0.6
    settings = SamplingSettings(max_new_tokens=2, temperature=temperature, repetition_penalty=rep,
                                frequency_penalty=freq, presence_penalty=pres, seed=5)
    out = generate_token_ids(model, [prompts[0]] * copies + [prompts[1]] * copies, settings,
                             pad_token_id=tok.pad_token_id, eos_token_ids=set(), batch_size=2 * copies)
    for k, prompt in enumerate(prompts):
        rows = out[k * copies:(k + 1) * copies]
        with torch.no_grad():
            first_logits = model(torch.tensor([prompt])).logits[0, -1]
        first = torch.bincount(torch.tensor([r[0] for r in rows]), minlength=first_logits.numel()).double()
        _close_to(first, _formula(_penalised(first_logits, prompt, [], rep, freq, pres), temperature, 0, 1.0), copies)
        t1 = int(first.argmax())
        with torch.no_grad():
            logits = model(torch.tensor([prompt + [t1]])).logits[0, -1]
        second = [r[1] for r in rows if r[0] == t1]
        assert len(second) > 300
        counts = torch.bincount(torch.tensor(second), minlength=logits.numel()).double()
        _close_to(counts, _formula(_penalised(logits, prompt, [t1], rep, freq, pres), temperature, 0, 1.0),
                  len(second))


def test_processed_distribution_equals_transformers_warpers():
    """sample_next's distribution (through frequencies over 30,000 draws on V = 700, two sample blocks and
    a tail) against transformers' Temperature → TopK → TopP warpers applied to the same logits."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 700, generator=g) * 2.5
    logits[0, 650] = logits.max() + 0.5  # the top token in the tail block
    for temperature, top_k, top_p in [(0.7, 120, 0.8), (2.0, 0, 0.5), (1.0, 300, 1.0)]:
        warpers = [TemperatureLogitsWarper(temperature)]
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1:
            warpers.append(TopPLogitsWarper(top_p))
        hf = torch.softmax(LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
                           .double(), -1)[0]
        assert torch.allclose(hf, _formula(logits[0], temperature, top_k, top_p), atol=1e-6)
        draws = 30_000
        tokens = sample_next(logits.expand(draws, -1), temperature, top_k=top_k, top_p=top_p,
                             generator=torch.Generator().manual_seed(0))
        _close_to(torch.bincount(tokens, minlength=700).double(), hf, draws)


def test_seed_reproduces_samples_and_temperature_zero_ignores_seed_and_filters(tiny):
    model, tok = tiny
    prompts = [chatml(u) for u in USERS]
    sampled = lambda seed: generate(model, tok, prompts, SamplingSettings(max_new_tokens=8, temperature=1.2, seed=seed))  # noqa: E731
    first = sampled(3)
    assert sampled(3) == first and sampled(4) != first
    greedy = [tok.decode(no_cache_greedy(model, ids_of(tok, p), 8, {tok.eos_token_id}), skip_special_tokens=True)
              for p in prompts]
    for settings in (SamplingSettings(max_new_tokens=8, temperature=0.0),
                     SamplingSettings(max_new_tokens=8, temperature=0.0, seed=9, top_k=3, top_p=0.2),
                     SamplingSettings(max_new_tokens=8, temperature=0.9, top_p=1e-9, seed=1)):  # nucleus of one
        assert generate(model, tok, prompts, settings) == greedy


# ---------------------------------------------------------------- stopping


def test_max_new_tokens_is_exact_and_eos_ends_only_its_row(tiny):
    model, tok = tiny
    prompts = [chatml(u) for u in USERS]
    for n in (0, 1, 7):
        out = ours_ids(model, tok, prompts, SamplingSettings(max_new_tokens=n, temperature=1.0, seed=0), set(),
                       batch_size=4)
        assert [len(r) for r in out] == [n] * len(prompts)
    free = ours_ids(model, tok, prompts, SamplingSettings(max_new_tokens=9, temperature=0.0), set())
    eos = {free[2][2]}  # row 2 ends on its 3rd token; the others run on unless they meet that id
    out = ours_ids(model, tok, prompts, SamplingSettings(max_new_tokens=9, temperature=0.0), eos)
    for full, got in zip(free, out):
        cut = next((i + 1 for i, t in enumerate(full) if t in eos), len(full))
        assert got == full[:cut]  # EOS kept as the last id, nothing (no padding) after it
    assert len(out[2]) == 3
    # A row whose very first token is an EOS: it ends at once, the rest of its batch goes on.
    eos = {free[0][0]}
    out = ours_ids(model, tok, prompts, SamplingSettings(max_new_tokens=9, temperature=0.0), eos, batch_size=3)
    assert out[0] == [free[0][0]]
    for full, got in zip(free, out):
        cut = next((i + 1 for i, t in enumerate(full) if t in eos), len(full))
        assert got == full[:cut]


def test_stop_string_cuts_text_and_ends_generation_at_the_completing_token(tiny):
    model, tok = tiny
    prompt = chatml(USERS[2])
    full_ids = ours_ids(model, tok, [prompt], SamplingSettings(max_new_tokens=20, temperature=0.0), set())[0]
    text = tok.decode(full_ids, skip_special_tokens=True)
    # A two-character stop string that begins after the first few characters.
    start = next(i for i in range(3, len(text) - 1) if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    settings = SamplingSettings(max_new_tokens=20, temperature=0.0, stop=["zzzz-never", stop])
    assert generate(model, tok, [prompt], settings) == [text[:text.find(stop)]]
    # Generation stops at the first token whose prefix decode contains the stop string.
    first = next(k for k in range(1, len(full_ids) + 1) if stop in tok.decode(full_ids[:k], skip_special_tokens=True))
    from posttrain.rollout import generate as gen_module

    ids = generate_token_ids(model, [ids_of(tok, prompt)], settings, pad_token_id=tok.pad_token_id,
                             eos_token_ids=set(), stop_check=gen_module._make_stop_check(tok, [stop]))[0]
    assert ids == full_ids[:first]


# ---------------------------------------------------------------- exact match


def test_exact_match_rules_hand_made():
    """Docstring: exact match after stripping surrounding whitespace; nothing else is normalised."""
    cases = [("m", "m", True), ("  m\n", "m", True), ("m", " m ", True), ("M", "m", False), ("m.", "m", False),
             ("m is the answer", "m", False), ("the answer: m", "m", False), ("", "m", False),
             ("t m  q", "t m q", False), ("t\tm q", "t m q", False), ("71", "71", True), ("071", "71", False)]
    for prediction, answer, want in cases:
        assert synthetic.answer_matches(prediction, answer) is want, (prediction, answer)
    predictions = [c[0] for c in cases]
    assert synthetic.exact_match(predictions, [c[1] for c in cases]) == sum(c[2] for c in cases) / len(cases)
    with pytest.raises(ValueError):
        synthetic.exact_match(["a"], ["a", "b"])


def test_eval_exact_match_is_correct_over_total_per_task_with_real_greedy_answers(tiny):
    """The eval scores what greedy generation produces: references built from the no-cache greedy loop's
    own text for some records (hits) and a wrong answer for others; the score is hits / scored records,
    per task, and records without an assistant turn are not counted."""
    from posttrain.eval.exact_match import exact_match
    from posttrain.models.presets import CHAT_TEMPLATE

    model, tok = tiny
    eos = {tok.eos_token_id}
    records, expected_hits = [], {"all": [], "smallest": [], "copy": []}
    for i, user in enumerate(USERS):
        task = "smallest" if i % 2 else "copy"
        text = tok.decode(no_cache_greedy(model, ids_of(tok, chatml(user)), 6, eos), skip_special_tokens=True)
        hit = i in (0, 1, 3)
        answer = ("  " + text + "\n") if hit else text + "x"
        records.append(Record(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                              source=f"synthetic:{task}:{i}"))
        expected_hits["all"].append(hit)
        expected_hits[task].append(hit)
    records.append(Record(messages=[{"role": "user", "content": "no answer here"}], source="synthetic:copy:99"))
    model.train()
    scores = exact_match(model, tok, CHAT_TEMPLATE, records, max_new_tokens=6, batch_size=4)
    assert model.training  # mode restored
    model.eval()
    assert scores == {name: sum(h) / len(h) for name, h in expected_hits.items()}
    assert scores["all"] == 3 / 6


def test_eval_exact_match_prompt_is_everything_before_the_last_assistant_turn(tiny, monkeypatch):
    """Multi-turn records: the prompt is the conversation up to the last assistant turn, rendered with the
    generation prompt; that turn is the answer."""
    import posttrain.rollout.generate as gen_module
    from posttrain.eval.exact_match import exact_match
    from posttrain.models.presets import CHAT_TEMPLATE

    seen = {}

    def fake_generate(model, tokenizer, prompts, settings, batch_size=8):
        seen["prompts"], seen["settings"] = prompts, settings
        return ["b", " c ", "wrong"]

    monkeypatch.setattr(gen_module, "generate", fake_generate)
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
             {"role": "assistant", "content": "b"}]
    records = [Record(messages=turns, source="x"), Record(messages=turns[:4] + [{"role": "assistant", "content": "c"}],
                                                          source="y"),
               Record(messages=turns[:2] + [{"role": "assistant", "content": "z"}], source="z")]
    model, tok = tiny
    scores = exact_match(model, tok, CHAT_TEMPLATE, records, max_new_tokens=5)
    assert scores == {"all": 2 / 3}
    assert seen["prompts"][0] == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n"
                                  "<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nu2<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert seen["settings"].temperature == 0 and seen["settings"].max_new_tokens == 5


# ---------------------------------------------------------------- synthetic tasks and the held-out split


def _answer(instruction: str) -> tuple[str, str]:
    """(task, answer) recomputed from the instruction text alone."""
    head, body = instruction.split(": ", 1)
    if head == "Add":
        a, plus, b = body.split(" ")
        assert plus == "+"
        return "addition", str(int(a) + int(b))
    letters = body.split(" ")
    assert all(c in string.ascii_lowercase and len(c) == 1 for c in letters) and 3 <= len(letters) <= 6
    return {
        "Smallest letter": ("smallest", sorted(letters)[0]),
        "Largest letter": ("largest", sorted(letters)[-1]),
        "Copy": ("copy", " ".join(letters)),
        "Reverse": ("reverse", " ".join(letters[::-1])),
        "Count letters": ("count", str(len(letters))),
    }[head]


def test_synthetic_answers_and_preferences_recomputed_independently():
    tasks = list(synthetic.TASKS)
    for seed in (0, 5):
        for example in synthetic.make_examples(tasks, 300, seed=seed):
            assert _answer(example.instruction) == (example.task, example.output)
        for row in synthetic.make_preference_rows(tasks, 120, seed=seed, kind="pairs"):
            correct = _answer(row["prompt"])[1]
            assert row["chosen"] == correct and row["rejected"] != correct
        for row in synthetic.make_preference_rows(tasks, 120, seed=seed, kind="ranking", num_responses=4):
            correct = _answer(row["prompt"])[1]
            assert len(set(row["responses"])) == 4
            best = [r for r, k in zip(row["responses"], row["ranks"]) if k == 0]
            assert best == [correct] and min(row["ranks"]) == 0
        for row in synthetic.make_preference_rows(tasks, 120, seed=seed, kind="unpaired"):
            assert row["label"] == (row["completion"] == _answer(row["prompt"])[1])


@pytest.mark.parametrize("tasks,n_train,n_eval,seed", [(["smallest", "copy", "reverse"], 22800, 1200, 0),
                                                       (["smallest", "copy", "reverse"], 22800, 1200, 1),
                                                       (["count"], 3000, 400, 2), (["smallest"], 3000, 200, 0)])
def test_held_out_prompts_never_appear_in_training_and_are_distinct(tasks, n_train, n_eval, seed):
    """The demo's split (24,000 rows, 5% held out; seeds 0 and 1) and small-space tasks: no eval prompt in
    train, eval prompts distinct, the sizes asked for, answers still correct."""
    train, held = synthetic.make_split(tasks, n_train, n_eval, seed=seed)
    assert len(train) == n_train and len(held) == n_eval
    held_prompts = [e.instruction for e in held]
    assert len(set(held_prompts)) == n_eval
    assert not set(held_prompts) & {e.instruction for e in train}
    assert all(_answer(e.instruction)[1] == e.output for e in held[:300] + train[:300])
    # The same through the SFT data pipeline (what the demo trains and scores on).
    if tasks == ["smallest", "copy", "reverse"] and seed == 0:
        from types import SimpleNamespace

        from posttrain.data.pipeline import _synthetic

        cfg = SimpleNamespace(eval_files=[], eval_fraction=0.05, synthetic_size=24000, synthetic_tasks=tasks)
        train_records, eval_records = _synthetic(cfg, seed)
        users = lambda rs: {r.messages[0]["content"] for r in rs}  # noqa: E731
        assert len(eval_records) == 1200 and not users(train_records) & users(eval_records)


# ---------------------------------------------------------------- posttrain generate: the prompts file


def test_generate_jsonl_row_with_a_raw_line_separator_is_one_prompt(tmp_path):
    from posttrain.inference import read_prompts

    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "first\u2028still the first"}, {"prompt": "second"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [json.loads(line) for line in path.read_bytes().decode().split("\n") if line] == rows  # valid JSONL
    assert read_prompts(str(path)) == rows


def test_generate_text_prompt_with_a_form_feed_stays_one_prompt(tmp_path):
    from posttrain.inference import read_prompts

    path = tmp_path / "p.txt"
    path.write_text("page one\x0cpage two\nsecond prompt\n", encoding="utf-8")
    assert read_prompts(str(path)) == [{"prompt": "page one\x0cpage two"}, {"prompt": "second prompt"}]


def test_generate_jsonl_prompts_with_a_byte_order_mark(tmp_path):
    from posttrain.inference import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n", encoding="utf-8-sig")
    assert read_prompts(str(path)) == [{"prompt": "a"}]


def test_generate_text_prompts_with_a_byte_order_mark(tmp_path):
    from posttrain.inference import read_prompts

    path = tmp_path / "p.txt"
    path.write_text("hello\nworld\n", encoding="utf-8-sig")
    assert read_prompts(str(path)) == [{"prompt": "hello"}, {"prompt": "world"}]


@pytest.mark.parametrize("flag,value", [("--top-p", "0"), ("--batch-size", "0")])
def test_generate_bad_sampling_flag_is_a_one_line_error(tmp_path, capsys, flag, value):
    from posttrain import cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    code = cli.main(["generate", "--model", "tiny", "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                     flag, value])
    err = capsys.readouterr().err
    assert code == 2 and (flag in err or flag.lstrip("-").replace("-", "_") in err), err

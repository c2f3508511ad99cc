"""Review of preference-batch layouts against the plain definition: every layout (a row per
sequence, right- or left-padded; shared-prompt blocks, one per row or packed; padding-free) must
give each sequence the summed log-prob (and reward-model score, and gradients) that the
unmodified model gives the sequence on its own, in float64.

The models are tiny random float64 decoders. transformers' RMSNorm computes in float32 even for
float64 inputs; the rounding of its backward then depends on how many responses share a prompt
(the shared layout sums their gradients before the norm, separate rows after), which leaves
~1e-7 relative differences in the gradients that are no fault of a layout. `_exact_norms` makes
the norms compute in the input's dtype so that the layouts can be held to ~1e-10.
"""

from __future__ import annotations

import random
import types

import pytest
import torch

from posttrain.data.records import Example
from posttrain.models.attention import (
    block_masks_allowed,
    pack_for,
    padding_free,
    takes_padding_free,
    window_allows,
)
from posttrain.models.readout import trims_last_layer
from posttrain.models.reward_model import score, score_shared_prompt
from posttrain.train.grouped import (
    Item,
    collate_items,
    collate_shared_prompt,
    shares_prompt,
)
from posttrain.train.preference import batch_logps, policy_logps

VOCAB, PAD = 128, 0


# --------------------------------------------------------------------------- helpers


def _config(kind: str, theta: float = 10000.0, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(kind, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                rope_theta=theta, initializer_range=0.2, pad_token_id=PAD, **extra)


def _exact_norms(model):
    """RMSNorm (and Qwen3's q/k norms) in the input's dtype instead of float32 (see the module docstring)."""
    def forward(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)
    return model


def _lm(kind: str, theta: float = 10000.0, seed: int = 0, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind, theta), attn_implementation=attention).double()
    return _exact_norms(model)


def _rm(kind: str, seed: int = 0, attention: str = "sdpa"):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(_config(kind, num_labels=1), attn_implementation=attention)
    return _exact_norms(model.double())


def _gpt2(head: str):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=PAD,
                        bos_token_id=1, eos_token_id=2, num_labels=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return (GPT2LMHeadModel if head == "lm" else GPT2ForSequenceClassification)(config).double()


def _tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def _item(prompt: list[int], responses: list[list[int]], ranks: list[int] | None = None) -> Item:
    sequences = [Example(prompt + r, [-100] * len(prompt) + r) for r in responses]
    return Item(sequences, ranks if ranks is not None else list(range(len(responses))))


def _block_length(item: Item) -> int:
    """Tokens of the item's shared-prompt block: the prompt once, then every response."""
    cut = next(i for i, t in enumerate(item.sequences[0].labels) if t != -100)
    return cut + sum(len(s) - cut for s in item.sequences)


def _widths(items: list[Item]) -> tuple[int, int, int]:
    """Row widths: the default (the longest block), the longest + 7 (other packings), every block
    in one row with no padding at all."""
    lengths = [_block_length(item) for item in items]
    return 0, max(lengths) + 7, sum(lengths)


def _edge_items(seed: int = 0) -> list[Item]:
    """Prompt of one token with a one-token response; one response much longer than its
    siblings; K = 2..5 (ties in the ranking); a prompt that is a prefix of another's, twice."""
    rng = random.Random(seed)
    prompt = _tokens(6, rng)
    return [_item([7], [[9], _tokens(3, rng)]),
            _item(prompt, [_tokens(1, rng), _tokens(14, rng), _tokens(2, rng)]),
            _item(prompt[:3], [_tokens(n, rng) for n in (2, 2, 4, 1, 3)], [0, 1, 1, 2, 3]),
            _item(_tokens(2, rng), [_tokens(1, rng), _tokens(1, rng)]),
            _item(prompt + [5], [_tokens(n, rng) for n in (3, 1, 2, 5)], [1, 0, 2, 3])]


def _alone_logps(model, seq: Example) -> torch.Tensor:
    """Σ log softmax of the model's own logits over one unpadded sequence (label t from position t − 1)."""
    logprobs = model(input_ids=torch.tensor([seq.input_ids])).logits[0].log_softmax(-1)
    picked = [logprobs[t - 1, token] for t, token in enumerate(seq.labels) if t > 0 and token != -100]
    return torch.stack(picked).sum() if picked else logprobs.new_zeros(())


def _alone_score(model, seq: Example) -> torch.Tensor:
    hidden = model.base_model(input_ids=torch.tensor([seq.input_ids])).last_hidden_state
    return model.score(hidden[0, -1])[0]


def _left_padded(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of a right-padded batch with its padding moved to the front."""
    shift = (batch["attention_mask"] == 0).sum(1)
    return tuple(torch.stack([row.roll(int(k)) for row, k in zip(batch[key], shift)])
                 for key in ("input_ids", "attention_mask", "labels"))


def _with_grads(model, fn, weights: torch.Tensor):
    """(values, gradients) of Σ weights · fn()."""
    model.zero_grad()
    values = fn()
    (values * weights.to(values.dtype)).sum().backward()
    return values.detach().double(), [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                      for p in model.parameters()]


def _assert_same(got, want, what: str, atol: float = 1e-10):
    values, grads = got
    assert torch.allclose(values, want[0], rtol=0, atol=atol), f"{what}: {(values - want[0]).abs().max():.3e}"
    for a, b in zip(grads, want[1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), f"{what} gradients: {(a - b).abs().max():.3e}"


def _logps_layouts(model, items: list[Item]) -> dict:
    """Every layout's per-sequence log-probs, as zero-argument functions (read the model as it is when called)."""
    rows = collate_items(items, PAD)
    ids, mask, labels = _left_padded(rows)
    layouts = {"rows_right": lambda: policy_logps(model, rows["input_ids"], rows["labels"], rows["attention_mask"], 3)[0],
               "rows_left": lambda: policy_logps(model, ids, labels, mask, 3)[0]}
    for width in _widths(items):
        layouts[f"shared_{width}"] = lambda w=width: batch_logps(model, collate_shared_prompt(items, PAD, w), 3)[0]
    return layouts


def _free_layouts(model, items: list[Item]) -> dict:
    return {f"padding_free_shared_{w}": lambda w=w: batch_logps(
        model, collate_shared_prompt(items, PAD, w, padding_free=True), 3)[0] for w in _widths(items)}


# --------------------------------------------------------------------------- log-probs: every layout == alone


@pytest.mark.parametrize("kind,theta", [("llama", 10000.0), ("mistral", 500.0), ("qwen2", 3.0), ("qwen3", 1e6)])
def test_every_layout_gives_each_sequence_its_own_log_probs_and_gradients(kind, theta):
    """Edge items (prompt of 1 token, response of 1, one long response, K = 2..5, prompts that
    prefix each other in the same row) in every layout, padding-free off then on, blocks packed
    at three row widths (`_widths`); rotary embeddings with four different rope_theta."""
    model = _lm(kind, theta)
    items = _edge_items()
    weights = torch.linspace(1, 2, sum(len(item.sequences) for item in items), dtype=torch.float64)
    alone = _with_grads(model, lambda: torch.stack([_alone_logps(model, s) for it in items for s in it.sequences]),
                        weights)
    for name, fn in _logps_layouts(model, items).items():
        _assert_same(_with_grads(model, fn, weights), alone, name)
    assert padding_free(model)
    for name, fn in (_logps_layouts(model, items) | _free_layouts(model, items)).items():
        _assert_same(_with_grads(model, fn, weights), alone, f"padding-free model, {name}")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches_in_every_layout_equal_each_sequence_alone(seed):
    """Random items (1..6 of them, K = 1..5, prompts 1..6 tokens, responses 1..9) on Llama,
    Qwen2 or Mistral with a random rope_theta: values and gradients, every layout."""
    rng = random.Random(seed)
    items = [_item(_tokens(rng.randint(1, 6), rng), [_tokens(rng.choice([1, 1, 2, 3, 9]), rng)
                                                     for _ in range(rng.randint(1, 5))]) for _ in range(rng.randint(1, 6))]
    model = _lm(["llama", "qwen2", "mistral"][seed % 3], theta=rng.choice([2.0, 100.0, 10000.0]), seed=seed)
    weights = torch.linspace(1, 2, sum(len(item.sequences) for item in items), dtype=torch.float64)
    alone = _with_grads(model, lambda: torch.stack([_alone_logps(model, s) for it in items for s in it.sequences]),
                        weights)
    for name, fn in _logps_layouts(model, items).items():
        _assert_same(_with_grads(model, fn, weights), alone, name)
    padding_free(model)
    for name, fn in (_logps_layouts(model, items) | _free_layouts(model, items)).items():
        _assert_same(_with_grads(model, fn, weights), alone, f"padding-free model, {name}")


def test_one_item_with_one_response_in_every_layout():
    model = _lm("llama")
    items = [_item([3], [[4]])]  # two tokens: one prompt token, one trained token
    expected = _alone_logps(model, items[0].sequences[0]).detach()
    for on in (False, True):
        padding_free(model, on)
        layouts = _logps_layouts(model, items) | (_free_layouts(model, items) if on else {})
        for name, fn in layouts.items():
            with torch.no_grad():
                assert torch.allclose(fn(), expected[None], rtol=0, atol=1e-12), name


def test_absolute_position_model_in_the_shared_layout():
    """RoPE only sees position differences, so a constant offset in a block's positions would
    pass every test above. GPT-2's learned absolute positions see the positions themselves:
    the shared layout (share_prompt has no model-type list) must restart them exactly."""
    model = _gpt2("lm").eval()
    items = _edge_items(seed=4)
    with torch.no_grad():
        alone = torch.stack([_alone_logps(model, s) for it in items for s in it.sequences])
        for width in (0, 1000):
            shared = batch_logps(model, collate_shared_prompt(items, PAD, width), 3)[0]
            assert torch.allclose(shared, alone, rtol=0, atol=1e-10)
    scorer = _gpt2("score").eval()
    with torch.no_grad():
        alone = torch.stack([_alone_score(scorer, s) for it in items for s in it.sequences]).float()
        batch = collate_shared_prompt(items, PAD, 1000)
        got = score_shared_prompt(scorer, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                  batch["last_token"])
    assert torch.allclose(got, alone, rtol=0, atol=1e-6)


def _gpt_neo():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_neo", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                  attention_types=[[["global"], 2]], max_position_embeddings=64, pad_token_id=PAD)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval()  # transformers' default attention: eager


@pytest.mark.parametrize("case", ["llama_eager_logps", "gpt_neo_logps", "llama_eager_reward"])
def test_shared_prompt_blocks_are_refused_where_attention_reads_no_block_mask(case):
    """BUG (fixed by refusing the layout): the shared-prompt mask is boolean and transformers hands
    a 4-D mask to the attention function as it is; eager attention *adds* it to the scores, so
    True/False became +1/+0 and every response saw its siblings (and other blocks). `run_dpo`
    and `run_rm` shared prompts on any decoder, and models without sdpa support load eager by
    default (GPT-Neo, GPT-J, CodeGen, Bloom, MPT, Gemma 2). The layout is wrong there (shown
    here), so `block_masks_allowed` turns it off for every attention but sdpa and the
    padding-free one built on it; with sdpa the same blocks equal each sequence alone."""
    items = _edge_items(seed=3)
    sequences = [s for item in items for s in item.sequences]
    if case == "llama_eager_reward":
        model = _rm("llama", attention="eager")
        with torch.no_grad():
            alone = torch.stack([_alone_score(model, s) for s in sequences]).float()
            batch = collate_shared_prompt(items, PAD)
            got = score_shared_prompt(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                      batch["last_token"])
    else:
        model = _lm("llama", attention="eager") if case == "llama_eager_logps" else _gpt_neo()
        with torch.no_grad():
            alone = torch.stack([_alone_logps(model, s) for s in sequences])
            got = batch_logps(model, collate_shared_prompt(items, PAD), 3)[0]
    assert model.config._attn_implementation == "eager"
    assert not torch.allclose(got.double(), alone.double(), rtol=0, atol=1e-6)  # why the layout is refused
    notes = []
    assert not block_masks_allowed(model, "dpo.share_prompt", notes.append)
    assert notes and "eager attention" in notes[0]
    if case != "gpt_neo_logps":  # the same model under sdpa: allowed, and right
        model.config._attn_implementation = "sdpa"
        assert block_masks_allowed(model, "dpo.share_prompt")
        with torch.no_grad():
            if case == "llama_eager_reward":
                batch = collate_shared_prompt(items, PAD)
                got = score_shared_prompt(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                          batch["last_token"])
            else:
                got = batch_logps(model, collate_shared_prompt(items, PAD), 3)[0]
        # (to 1e-5: transformers' RMSNorm rounds through float32 in a float64 model; the eager
        # layout is off by 0.03–4, above)
        assert torch.allclose(got.double(), alone.double(), rtol=0, atol=1e-5), f"{(got.double() - alone).abs().max():.3e}"


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_runs_ask_whether_the_attention_reads_block_masks(stage, tmp_path, monkeypatch):
    from posttrain.config import DPOConfig, RMConfig
    from posttrain.models import attention
    from posttrain.train.preference import run_dpo
    from posttrain.train.reward import run_rm

    from posttrain.train import preference

    asked = []
    original = attention.block_masks_allowed

    def recording(m, option, log=None):
        asked.append(option)
        return original(m, option, log)

    monkeypatch.setattr(attention, "block_masks_allowed", recording)  # run_rm imports it when it runs
    monkeypatch.setattr(preference, "block_masks_allowed", recording)
    overrides = [f"output_dir={tmp_path / 'run'}", "data.synthetic_size=16", "data.max_length=64",
                 "train.max_steps=1", "train.batch_size=4", "train.progress_bar=false"]
    (run_rm(RMConfig.load(None, overrides)) if stage == "rm" else run_dpo(DPOConfig.load(None, overrides)))
    assert asked == [("reward" if stage == "rm" else "dpo") + ".share_prompt"]


@pytest.mark.parametrize("layout", ["shared", "padding_free_shared", "rows_left"])
def test_a_label_on_the_first_token_is_never_predicted(layout):
    """BUG (edge case: an Example whose first token is trained, i.e. an empty prompt). In the
    Hugging Face convention label t is predicted from position t − 1, so a label at position 0
    has no predictor: the model alone, right-padded rows and `sequence_logps` drop it. The shared
    layout takes `cut − 1` = −1 as its predictor (grouped.py:148), i.e. the previous block's last
    token in the row, or the last slot of the whole batch, a read across items; `shares_prompt`
    accepts the empty prompt (grouped.py:45-50). Left-padded rows predict it from the padding
    just before it (preference.py:66 keeps it out of `predicts`, but `sequence_logps` still reads
    the label, from a zero hidden state padding-free and from the pad's own state otherwise).
    Fixed: `shares_prompt` refuses an empty prompt, and `policy_logps` drops a label that
    follows padding."""
    rng = random.Random(10)
    items = [_item(_tokens(3, rng), [_tokens(2, rng), _tokens(4, rng)]),
             _item([], [_tokens(3, rng), _tokens(2, rng)]),
             _item(_tokens(2, rng), [_tokens(1, rng), _tokens(5, rng)])]
    model = _lm("llama")
    with torch.no_grad():
        alone = torch.stack([_alone_logps(model, s) for it in items for s in it.sequences])
        rows = collate_items(items, PAD)
        right = policy_logps(model, rows["input_ids"], rows["labels"], rows["attention_mask"])[0]
        assert torch.allclose(right, alone, rtol=0, atol=1e-10)
        if layout == "padding_free_shared":
            padding_free(model)
        if layout == "rows_left":
            ids, mask, labels = _left_padded(rows)
            got = policy_logps(model, ids, labels, mask)[0]
        else:  # fixed by keeping such an item out of the shared layout: the stages check shares_prompt
            assert not shares_prompt(items[1]) and shares_prompt(items[0]) and shares_prompt(items[2])
            return
    assert torch.allclose(got, alone, rtol=0, atol=1e-10), f"{(got - alone).abs().max():.3e}"


# --------------------------------------------------------------------------- the shared layout's structure


def test_shared_layout_positions_predictors_and_mask_block_by_block():
    """Positions restart at 0 for every block and at the prompt's length for every response; the
    first trained token of every response is predicted from its prompt's last token; no query sees
    another block (a prompt that is a prefix of another's included) or a sibling response."""
    items = _edge_items()
    longest, total = max(map(_block_length, items)), sum(map(_block_length, items))
    for width in _widths(items):
        batch = collate_shared_prompt(items, PAD, width)
        rows, row_width = batch["input_ids"].shape
        mask = batch["attention_mask"][:, 0]
        positions = batch["position_ids"].flatten()
        predictor = batch["predictor"].tolist()
        for s, (g, k) in enumerate(zip(batch["group"].tolist(), batch["slot"].tolist())):
            item, seq = items[g], items[g].sequences[k]
            cut = next(i for i, t in enumerate(seq.labels) if t != -100)
            last = int(batch["last_token"][s])
            n = len(seq) - cut
            assert positions[last - n + 1: last + 1].tolist() == list(range(cut, len(seq)))
            assert batch["input_ids"].flatten()[last - n + 1: last + 1].tolist() == seq.input_ids[cut:]
            trained = [i for i, sq in enumerate(batch["sequence"].tolist()) if sq == s]
            start = last - n + 1 - sum(len(o) - cut for o in item.sequences[:k]) - cut  # the block's first token
            assert positions[start: start + cut].tolist() == list(range(cut))
            assert batch["input_ids"].flatten()[start: start + cut].tolist() == seq.input_ids[:cut]
            assert predictor[trained[0]] == start + cut - 1  # the prompt's last token, not the previous response's end
            assert [predictor[i] for i in trained[1:]] == list(range(last - n + 1, last))
            row, col = divmod(last, row_width)
            visible = mask[row, col].nonzero().squeeze(1).tolist()
            block_start = start - row * row_width
            assert visible == list(range(block_start, block_start + cut)) + list(range(col - n + 1, col + 1))
        if width == total:
            assert rows == 1 and row_width == total and int(batch["real_tokens"]) == total  # exact fit: no padding
        else:
            assert rows > 1 and (row_width == longest if width == 0 else longest <= row_width <= width)


def test_exact_fit_and_many_tiny_blocks_pack_longest_first_and_stay_apart():
    """Blocks of 8, 3 and 5 tokens: the 8 first, alone, then the 5 and the 3 fill the second
    row exactly (no padding anywhere). Then twenty two- and three-token blocks, most with the same
    one-token prompt, in one row: every block sees only itself, and log-probs (padded and
    padding-free) equal each sequence alone."""
    rng = random.Random(0)
    items = [_item(_tokens(2, rng), [_tokens(3, rng), _tokens(3, rng)]),
             _item(_tokens(1, rng), [_tokens(1, rng), _tokens(1, rng)]),
             _item(_tokens(3, rng), [_tokens(1, rng), _tokens(1, rng)])]
    assert [_block_length(item) for item in items] == [8, 3, 5]
    batch = collate_shared_prompt(items, PAD)
    assert batch["input_ids"].shape == (2, 8) and int(batch["real_tokens"]) == 16
    owner_of_row = [[g for g, last in zip(batch["group"].tolist(), batch["last_token"].tolist()) if last // 8 == r]
                    for r in range(2)]
    assert set(owner_of_row[0]) == {0} and set(owner_of_row[1]) == {1, 2}
    assert collate_shared_prompt(items, PAD, padding_free=True)["input_ids"].shape == (1, 16)

    tiny = [_item([5], [_tokens(1, rng)] * rng.randint(1, 2)) if i % 3 else _item([5, 6], [_tokens(1, rng)])
            for i in range(20)]
    width = sum(_block_length(item) for item in tiny)
    batch = collate_shared_prompt(tiny, PAD, width)
    assert batch["input_ids"].shape == (1, width)
    mask = batch["attention_mask"][0, 0]
    blocks, offset = [], 0
    for item in sorted(tiny, key=_block_length, reverse=True):  # longest first, ties in item order
        blocks.append(range(offset, offset + _block_length(item)))
        offset += _block_length(item)
    for span in blocks:
        outside = torch.ones(width, dtype=torch.bool)
        outside[span.start: span.stop] = False
        assert not mask[span.start: span.stop][:, outside].any()
        assert batch["position_ids"][0, span.start] == 0
    model = _lm("qwen2", theta=7.0)
    with torch.no_grad():
        alone = torch.stack([_alone_logps(model, s) for it in tiny for s in it.sequences])
        assert torch.allclose(batch_logps(model, batch, 3)[0], alone, rtol=0, atol=1e-10)
        padding_free(model)
        free = collate_shared_prompt(tiny, PAD, width, padding_free=True)
        assert torch.allclose(batch_logps(model, free, 3)[0], alone, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- reward-model scores


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_reward_scores_and_gradients_in_every_layout_equal_each_sequence_alone(kind):
    """Scores are float32 (`scores_at`), so values agree to float32 rounding; the weights are
    exact in float32, so the gradients (float64 parameters) are held to 1e-10."""
    model = _rm(kind)
    items = _edge_items(seed=2)
    weights = torch.linspace(1, 2, 5 * sum(len(item.sequences) for item in items) - 4)[::5]  # multiples of 1/4
    alone = _with_grads(model, lambda: torch.stack([_alone_score(model, s) for it in items for s in it.sequences]),
                        weights)
    rows = collate_items(items, PAD)
    ids, mask, _ = _left_padded(rows)

    def shared(width, free=False):
        b = collate_shared_prompt(items, PAD, width, padding_free=free)
        return score_shared_prompt(model, b["input_ids"], b["attention_mask"], b["position_ids"], b["last_token"],
                                   b.get("packed_slots"))

    layouts = {"rows_right": lambda: score(model, rows["input_ids"], rows["attention_mask"]),
               "shared_0": lambda: shared(0), "shared_one_row": lambda: shared(1000)}
    for on in (False, True):
        assert padding_free(model, on) == on
        extra = {"rows_left": lambda: score(model, ids, mask),  # padded left rows: see the BUG test below
                 "free_shared_0": lambda: shared(0, True), "free_shared_one_row": lambda: shared(1000, True)}
        for name, fn in (layouts | (extra if on else {})).items():
            values, grads = _with_grads(model, fn, weights)
            assert torch.allclose(values, alone[0].float().double(), rtol=0, atol=1e-6), name
            for a, b in zip(grads, alone[1]):
                assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), f"{name} gradients: {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padded_reward_scores_equal_each_sequence_alone(kind):
    """BUG: `models.reward_model.score` on left-padded rows, when the model does not take
    padding-free batches, hands the model the 2-D mask but no position_ids (reward_model.py:132-133),
    so every token's position counts the row's padding. README ("scored at the last real token
    ... left or right padding alike") promises either side. With GPT-2's learned absolute
    positions the scores are off by ~0.1; with RoPE (whose cos / sin transformers computes in
    float32) the float64 gradients are off by ~1e-6 instead of ~1e-14. `policy_logps` passes
    positions counted over the real tokens (preference.py:78-79), and so does `pack_rows`."""
    model = _gpt2("score").eval() if kind == "gpt2" else _rm(kind)
    items = _edge_items(seed=2)
    weights = torch.linspace(1, 2, 5 * sum(len(item.sequences) for item in items) - 4)[::5]
    alone = _with_grads(model, lambda: torch.stack([_alone_score(model, s) for it in items for s in it.sequences]),
                        weights)
    ids, mask, _ = _left_padded(collate_items(items, PAD))
    assert not takes_padding_free(model)
    values, grads = _with_grads(model, lambda: score(model, ids, mask), weights)
    assert torch.allclose(values, alone[0].float().double(), rtol=0, atol=1e-6)
    for a, b in zip(grads, alone[1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), f"gradients: {(a - b).abs().max():.3e}"


# --------------------------------------------------------------------------- losses on mixed batches


def test_dpo_loss_on_pairs_and_rankings_packed_equals_the_formula_on_each_sequence_alone():
    """Pairs and K-way rankings in one batch: `pair_extras` numbers sequences item by item; the
    shared layout (blocks packed several to a row, padding-free too) must number them the same."""
    from posttrain.config import DPOLossConfig
    from posttrain.losses.preference import dpo_loss
    from posttrain.train.preference import PreferenceLoss, pair_extras

    model = _lm("mistral", theta=50.0)
    items = _edge_items(seed=6)
    rng = random.Random(6)
    for item in items:
        item.reference_logps = [rng.randint(-240, -40) / 8 for _ in item.sequences]  # exact in float32
    extras = pair_extras(items)

    def formula():
        logps = torch.stack([_alone_logps(model, s) for it in items for s in it.sequences])
        ref = torch.tensor([v for it in items for v in it.reference_logps], dtype=torch.float64)
        c, r = extras["chosen_row"], extras["rejected_row"]
        losses = dpo_loss(logps[c], logps[r], ref[c], ref[r], 0.3)[0]
        return (losses * extras["pair_weight"].double()).sum()

    module = PreferenceLoss(model, DPOLossConfig(loss="dpo", beta=0.3), chunk_size=3)

    def loss(batch):
        batch = batch | extras
        batch["reference_logps"] = batch["reference_logps"].double()
        return module(**batch)[0]

    one = torch.ones(1, dtype=torch.float64)
    expected = _with_grads(model, lambda: formula()[None], one)
    rows = collate_items(items, PAD)
    shared = collate_shared_prompt(items, PAD, 1000) | {"reference_logps": rows["reference_logps"]}
    for on in (False, True):
        padding_free(model, on)
        _assert_same(_with_grads(model, lambda: loss(rows)[None], one), expected, f"rows, padding-free {on}")
        _assert_same(_with_grads(model, lambda: loss(shared)[None], one), expected, f"shared, padding-free {on}")
    free = collate_shared_prompt(items, PAD, 1000, padding_free=True) | {"reference_logps": rows["reference_logps"]}
    _assert_same(_with_grads(model, lambda: loss(free)[None], one), expected, "padding-free shared")


def test_kto_on_pairs_rankings_and_unpaired_items_equals_the_formula_on_each_sequence_alone():
    """KTO splits pairs and rankings into unpaired items and adds each a mismatched partner; its
    rows are selected out of one right-padded batch (padding-free: packed again)."""
    from posttrain.config import DPOLossConfig
    from posttrain.losses.preference import kto_loss
    from posttrain.train.preference import PreferenceLoss, kto_extras, kto_items

    rng = random.Random(8)
    source = _edge_items(seed=8)[:3] + [Item([Example(p + r, [-100] * len(p) + r)], None, desirable=d)
                                        for p, r, d in ((_tokens(2, rng), _tokens(5, rng), True),
                                                        (_tokens(1, rng), _tokens(1, rng), False))]
    items = kto_items(source, max_length=64, log=lambda *_: None)
    for item in items:
        item.reference_logps = [rng.randint(-240, -40) / 8 for _ in item.sequences]  # exact in float32
    extras = kto_extras(items)
    model = _lm("qwen2", theta=20.0)
    ref = torch.tensor([v for it in items for v in it.reference_logps], dtype=torch.float64)

    def formula():
        completions = torch.stack([_alone_logps(model, it.sequences[0]) for it in items])
        with torch.no_grad():
            kl = (torch.stack([_alone_logps(model, it.sequences[1]) for it in items]) - ref[extras["kl_row"]]).mean()
        return kto_loss(completions, ref[extras["completion_row"]], extras["desirable"], kl, 0.2)[0].sum()

    module = PreferenceLoss(model, DPOLossConfig(loss="kto", beta=0.2), chunk_size=3)
    batch = collate_items(items, PAD) | extras | {"reference_logps": ref}
    one = torch.ones(1, dtype=torch.float64)
    expected = _with_grads(model, lambda: formula()[None], one)
    for on in (False, True):
        padding_free(model, on)
        _assert_same(_with_grads(model, lambda: module(**batch)[0][None], one), expected, f"padding-free {on}")


# --------------------------------------------------------------------------- switching padding-free


def test_pack_for_rows_without_padding_and_switching_padding_free_off_restores_everything():
    """Rows without padding still go padding-free while the last layer is trimmed (a causal
    (B, 1, 1, T) mask); `padding_free(model, False)` gives back sdpa, the layer's own forward
    and plain rows, bit for bit; a too-long `longest` switches an enabled model off too."""
    model = _lm("llama")
    rng = random.Random(9)
    ids = torch.tensor([_tokens(6, rng), _tokens(6, rng)])
    full = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        before = policy_logps(model, ids, labels, full)[0]
    assert pack_for(model, ids, full) is None
    assert padding_free(model) and trims_last_layer(model)
    packed = pack_for(model, ids, full)
    assert packed is not None and packed["attention_mask"].shape == (2, 1, 1, 6)
    assert packed["position_ids"].tolist() == [list(range(6)) * 2] and packed["packed_slots"].tolist() == list(range(12))
    with torch.no_grad():
        assert torch.allclose(policy_logps(model, ids, labels, full)[0], before, rtol=0, atol=1e-12)
    layer = model.model.layers[-1]
    assert not padding_free(model, False)
    assert model.config._attn_implementation == "sdpa" and not takes_padding_free(model)
    assert not trims_last_layer(model) and "forward" not in layer.__dict__
    assert pack_for(model, ids, full) is None and pack_for(model, ids, torch.tensor([[1] * 6, [1] * 4 + [0] * 2])) is None
    with torch.no_grad():
        assert torch.equal(policy_logps(model, ids, labels, full)[0], before)
    with pytest.raises(RuntimeError):  # a padding-free batch is refused loudly once switched off
        batch_logps(model, collate_shared_prompt(_edge_items(), PAD, padding_free=True))
    assert padding_free(model) and padding_free(model)  # idempotent
    windowed = _lm("mistral")
    windowed.config.sliding_window = 8
    assert padding_free(windowed, longest=8) and not padding_free(windowed, longest=9)
    assert windowed.config._attn_implementation == "sdpa" and not trims_last_layer(windowed)
    assert window_allows(windowed, 8, "x") and not window_allows(windowed, 9, "x")

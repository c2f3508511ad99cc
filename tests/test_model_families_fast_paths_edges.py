"""Review of posttrain's fast model paths across model families, against a plain transformers
forward of every unpadded row on its own with the full float64 log-softmax.

The fast paths: padding-free batches (`models.attention`: `padding_free`, `pack_for`, the packed
sdpa attention, the sliding-window and block-mask guards), the trimmed last layer
(`models.readout`), the lean RMSNorm / SwiGLU layers (`models.lean`) and the chunked head
(`models.loading.final_hidden_and_head`, `losses.language_modeling`). They are exercised through
the product's own entry points: SFT's `CausalLMLoss`, DPO's `policy_logps` / `batch_logps`
(shared-prompt rows too), the reward model's `score`, and RL's `completion_forward`.

Families: Llama with grouped-query attention (one KV head) and attention / MLP biases, Llama and
Qwen2 with tied embeddings, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mistral with a sliding
window wider than every row; Mistral / Qwen2 / Qwen3 windows narrower than the rows (the guards);
GPT-2 and OPT (padding-free does not apply: they must fall back, and say so). Norm weights are
moved away from 1 so their gradients are exercised. Every reference is an untouched model with
the same weights (never switched, no lean layers, no checkpointing), run row by row.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from posttrain.models.attention import padding_free, takes_padding_free
from posttrain.models.lean import lean_activations
from posttrain.models.loading import enable_gradient_checkpointing, supports_hidden_path
from posttrain.models.readout import trims_last_layer

V, PAD = 100, 0

# name -> (model_type, config overrides); the first six take padding-free batches
FAMILIES = {
    "llama_gqa_biases": ("llama", {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "mistral_wide_window": ("mistral", {"sliding_window": 64, "head_dim": 16}),
}
FAST = list(FAMILIES)
FALLBACK = {
    "gpt2": ("gpt2", {}),
    "opt": ("opt", {}),
    "opt_project_out": ("opt", {"word_embed_proj_dim": 16, "do_layer_norm_before": False}),
}

# prompts and completions: a one-token prompt, one-token completions, one long row
PROMPTS = [[5, 6, 7], [13], [20, 21, 22, 23, 24, 25], [40, 41]]
COMPLETIONS = [[8, 9], [14], [30, 31, 32, 33, 34, 35, 36], [42]]
LONGEST = max(len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS))  # 13


def _config(kind: str, extra: dict, **more):
    from transformers import AutoConfig

    if kind == "gpt2":
        settings = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "resid_pdrop": 0.0,
                    "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 1, "eos_token_id": 2}
    elif kind == "opt":
        settings = {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0,
                    "word_embed_proj_dim": 32}
    else:
        settings = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.2}
    settings.update(vocab_size=V, pad_token_id=PAD)
    settings.update(extra)
    settings.update(more)
    return AutoConfig.for_model(kind, **settings)


def _perturb_norms(model):
    torch.manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _lm(name: str, table: dict = FAMILIES, lean: bool = False, **more):
    """A float64 causal LM. With `lean`, the lean layers go on while the weights are float32: lean
    only takes an MLP whose weights are float32 / bf16 / fp16 (`lean._eligible` treats any other
    dtype as quantised), and its forwards then run the float64 weights as they are."""
    from transformers import AutoModelForCausalLM

    kind, extra = table[name]
    torch.manual_seed(0)
    model = _perturb_norms(AutoModelForCausalLM.from_config(_config(kind, extra, **more), attn_implementation="sdpa"))
    if lean:
        assert lean_activations(model, True) > 0
    return model.double()


def _pair(name: str, table: dict = FAMILIES, lean: bool = False, **more):
    """(the model the product switches, an untouched reference with the same float64 weights)."""
    model = _lm(name, table, lean, **more)
    ref = _lm(name, table, False, **more)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    return model, ref


def _swiglu_is_lean(model) -> bool:
    return all(isinstance(layer.mlp.__dict__.get("forward"), functools.partial) for layer in model.model.layers)


def _rm(name: str, table: dict = FAMILIES):
    from transformers import AutoModelForSequenceClassification

    kind, extra = table[name]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(_config(kind, extra, num_labels=1),
                                                           attn_implementation="sdpa").double()
    return _perturb_norms(model)


def _fast(model, checkpointing: bool, longest: int = LONGEST):
    """The product's other switches on `model` (lean is `_lm`'s); returns it."""
    if checkpointing:
        enable_gradient_checkpointing(model)
        model.train()
    heard = []
    assert padding_free(model, log=heard.append, longest=longest), heard
    assert takes_padding_free(model) and trims_last_layer(model)
    return model


def _alone_log_softmax(ref, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(len(ids), V) full log-softmax of the reference model on the unpadded row, in float64."""
    logits = ref(input_ids=torch.tensor([ids])).logits[0].double()
    return (logits / temperature).log_softmax(-1)


def _alone_completion_logps(ref, temperature: float = 1.0) -> list[torch.Tensor]:
    out = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        lp = _alone_log_softmax(ref, p + c, temperature)
        out.append(torch.stack([lp[len(p) + j - 1, t] for j, t in enumerate(c)]))
    return out


def _rows(side: str):
    """(input_ids, attention_mask, labels) of the prompt + completion rows, padded on `side`."""
    width = LONGEST
    n = len(PROMPTS)
    ids = torch.full((n, width), PAD, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        length = len(p) + len(c)
        s = 0 if side == "right" else width - length
        ids[i, s:s + length] = torch.tensor(p + c)
        mask[i, s:s + length] = 1
        labels[i, s + len(p):s + length] = torch.tensor(c)
    return ids, mask, labels


def _grads(model) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def _close_grads(got, want, rtol=1e-10, atol=1e-12, what=""):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: {(a - b).abs().max():.3e}"


class _Recorder:
    """Counts the trimmed last layer's calls and the packed batches, to prove the fast path ran."""

    def __init__(self, monkeypatch):
        from posttrain.models import attention, readout

        self.read, self.packed = [], []
        layer_at, pack_rows = readout._layer_at, attention.pack_rows
        monkeypatch.setattr(readout, "_layer_at",
                            lambda layer, hidden, read_at, **kw: self.read.append(len(read_at))
                            or layer_at(layer, hidden, read_at, **kw))
        monkeypatch.setattr(attention, "pack_rows", lambda *a: self.packed.append(1) or pack_rows(*a))


# --------------------------------------------------------------------------- DPO rows (policy_logps)


@pytest.mark.parametrize("name, mode", [*[(name, "lean_checkpointed") for name in FAST],
                                        ("llama_gqa_biases", "plain"), ("qwen3", "plain")])
def test_preference_row_log_probs_and_gradients_equal_each_row_alone(name, mode, monkeypatch):
    """`policy_logps` (KTO, dpo.share_prompt=false, the reference pass) on rows padded left and
    right, through padding-free attention and the trimmed last layer: per-sequence summed
    log-probs and every parameter's gradient equal the unpadded rows' own, in float64."""
    from posttrain.train.preference import policy_logps

    lean = checkpointing = mode == "lean_checkpointed"
    model, ref = _pair(name, lean=lean)
    assert _swiglu_is_lean(model) == lean
    _fast(model, checkpointing)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    ref.zero_grad()
    expected = torch.stack([x.sum() for x in _alone_completion_logps(ref)])
    (expected * weights).sum().backward()
    want = _grads(ref)
    recorder = _Recorder(monkeypatch)
    for side in ("right", "left"):
        ids, mask, labels = _rows(side)
        model.zero_grad()
        got, counts = policy_logps(model, ids, labels, mask, chunk_size=3)
        (got * weights).sum().backward()
        assert counts.tolist() == [len(c) for c in COMPLETIONS]
        assert torch.allclose(got.detach(), expected.detach(), rtol=0, atol=1e-12), side
        _close_grads(_grads(model), want, what=f"{name} {mode} {side}")
    # the fast path ran: two packed batches, the last layer read at the 11 predicting tokens only
    assert len(recorder.packed) == 2 and recorder.read and all(r == sum(map(len, COMPLETIONS)) for r in recorder.read)


# --------------------------------------------------------------------------- RL completions


@pytest.mark.parametrize("name, lean, entropy_grad, temperature", [
    ("llama_gqa_biases", True, True, 1.0),
    ("llama_tied", False, False, 0.7),
    ("qwen2", True, False, 1.0),
    ("qwen2_tied", True, True, 0.7),
    ("qwen3", True, True, 1.3),
    ("mistral_wide_window", False, True, 1.0),
])
def test_rl_completion_log_probs_entropies_and_gradients_equal_each_row_alone(name, lean, entropy_grad, temperature):
    """GRPO / PPO's `completion_forward` under gradient checkpointing: per-token log-probs and
    entropies of softmax(logits / T), with gradients through both, equal each row's own full
    float64 log-softmax (completions of one token included)."""
    from posttrain.train.rollouts import (
        collate_completions,
        completion_forward,
        completion_logps,
    )

    model, ref = _pair(name, lean=lean)
    assert _swiglu_is_lean(model) == lean
    _fast(model, checkpointing=True)
    batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=PAD)
    weights = torch.linspace(-1, 2, batch["response_mask"].numel(), dtype=torch.float64).view_as(batch["response_mask"])
    mask = batch["response_mask"].double()

    want_logps = torch.zeros_like(mask)
    want_entropy = torch.zeros_like(mask)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        lp = _alone_log_softmax(ref, p + c, temperature)
        for j, t in enumerate(c):
            want_logps[i, j] = lp[len(p) + j - 1, t]
            want_entropy[i, j] = -(lp[len(p) + j - 1].exp() * lp[len(p) + j - 1]).sum()
    target = want_logps + (want_entropy if entropy_grad else 0)
    ref.zero_grad()
    (target * weights * mask).sum().backward()
    want = _grads(ref)

    model.zero_grad()
    out = completion_forward(model, batch, chunk_size=3, entropy_grad=entropy_grad, temperature=temperature)
    assert torch.allclose(out["logps"].detach() * mask, want_logps.detach(), rtol=0, atol=1e-12)
    assert torch.allclose(out["entropy"].detach() * mask, want_entropy.detach(), rtol=0, atol=1e-12)
    ((out["logps"] + (out["entropy"] if entropy_grad else 0)) * weights * mask).sum().backward()
    _close_grads(_grads(model), want, what=name)
    with torch.no_grad():
        again = completion_logps(model, batch, chunk_size=2, temperature=temperature)
    assert torch.allclose(again * mask, want_logps.detach(), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- SFT (chunked head)


@pytest.mark.parametrize("name", [*FAST, *FALLBACK])
def test_sft_chunked_loss_and_gradients_equal_each_row_alone(name):
    """SFT's `CausalLMLoss` (train.loss=auto: the chunked head on the final hidden states) on
    right-padded rows, lean layers on, gradient checkpointing on: the summed NLL and gradients
    equal −Σ log softmax of each unpadded row's own logits (tied and untied heads, GPT-2's tied
    head, OPT's project_out)."""
    from posttrain.train.sft import CausalLMLoss

    table = FAMILIES if name in FAMILIES else FALLBACK
    model, ref = _pair(name, table, lean=name in FAMILIES)  # lean changes nothing in GPT-2 / OPT
    assert name not in FAMILIES or _swiglu_is_lean(model)
    enable_gradient_checkpointing(model)
    model.train()
    module = CausalLMLoss(model, "auto", chunk_size=3)
    assert module.loss_kind == "chunked" and supports_hidden_path(model)
    ref.zero_grad()
    expected = -sum(x.sum() for x in _alone_completion_logps(ref))
    expected.backward()
    ids, mask, labels = _rows("right")
    model.zero_grad()
    loss = module(ids, labels, mask)
    loss.backward()
    assert torch.allclose(loss.detach(), expected.detach(), rtol=0, atol=1e-12)
    _close_grads(_grads(model), _grads(ref), what=name)


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_sft_loss_on_left_padded_rows_equals_each_row_alone(name):
    """`CausalLMLoss.forward(input_ids, labels, attention_mask)` keeps a left-padded row's 2-D mask
    but passes no position_ids, so transformers numbers the positions from the first padding
    slot. GPT-2's learned absolute positions then read the wrong embeddings (loss off by ~7e-3
    here); RoPE models drift by ~2e-7 (transformers computes cos / sin in float32, at other
    angles). `policy_logps` and `score` pass `real_positions` for the same rows
    (`data.batching.padded_inputs`); passing them here gives 0 and 7e-15. SFT's own collator
    right-pads, so this is latent for the CLI, but the class takes any mask."""
    from posttrain.train.sft import CausalLMLoss

    model = _lm(name, FALLBACK if name in FALLBACK else FAMILIES).eval()
    with torch.no_grad():
        expected = -sum(x.sum() for x in _alone_completion_logps(model))
        ids, mask, labels = _rows("left")
        got = CausalLMLoss(model, "auto", chunk_size=3)(ids, labels, mask)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10), f"{(got - expected).abs():.3e}"


# --------------------------------------------------------------------------- reward models


@pytest.mark.parametrize("name", [*FAST, "gpt2", "opt"])
def test_reward_scores_and_gradients_equal_the_classifier_s_own_forward_on_each_row(name):
    """`reward_model.score` on rows padded either side, a one-token row among them, with
    gradient checkpointing (and padding-free + the trimmed last layer where it applies): each
    score equals transformers' own sequence-classification forward on the unpadded row (its
    logits at the last token), and so do the gradients. Scores are float32 by design
    (`scores_at`); the weights are multiples of 1/4 so the float32 cast loses nothing in the
    backward."""
    from posttrain.models.reward_model import score

    table = FAMILIES if name in FAMILIES else FALLBACK
    model = _rm(name, table)
    ref = copy.deepcopy(model)
    enable_gradient_checkpointing(model)
    model.train()
    heard = []
    assert padding_free(model, log=heard.append, longest=LONGEST) == (name in FAMILIES)
    assert bool(heard) == (name not in FAMILIES)
    rows = [p + c for p, c in zip(PROMPTS, COMPLETIONS)] + [[77]]
    weights = torch.tensor([0.25, -1.5, 2.0, 0.75, -0.5])
    ref.zero_grad()
    expected = torch.stack([ref(input_ids=torch.tensor([r])).logits[0, 0] for r in rows])
    (expected * weights.double()).sum().backward()
    want = _grads(ref)
    for side in ("right", "left"):
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            s = 0 if side == "right" else width - len(r)
            ids[i, s:s + len(r)] = torch.tensor(r)
            mask[i, s:s + len(r)] = 1
        model.zero_grad()
        got = score(model, ids, mask)
        assert got.dtype == torch.float32
        assert torch.allclose(got.detach(), expected.detach().float(), rtol=0, atol=1e-6), side
        (got * weights).sum().backward()
        _close_grads(_grads(model), want, what=f"{name} {side}")


# --------------------------------------------------------------------------- shared-prompt rows


def _items():
    from posttrain.data.records import Example
    from posttrain.train.grouped import Item

    def item(prompt, responses):
        return Item([Example(prompt + r, [-100] * len(prompt) + r) for r in responses], list(range(len(responses))))

    return [item([5, 6, 7], [[8, 9], [10, 11, 12], [13]]), item([13], [[14], [15, 16]]),
            item([20, 21, 22, 23, 24, 25], [[30], [31, 32, 33, 34, 35, 36, 37]])]


@pytest.mark.parametrize("name", FAST)
def test_shared_prompt_padding_free_rows_equal_each_sequence_alone(name):
    """DPO's shared-prompt blocks, padding-free, lean layers, gradient checkpointing: each
    sequence's log-prob equals its own row's to 1e-12; gradients equal those of the same blocks
    through the never-switched model (plain transformers with the 4-D mask) to 1e-10, and each
    sequence alone to float32 rounding (transformers' RMSNorm rounds through float32, and the
    shared layout sums a prompt's gradients before the norm)."""
    from posttrain.train.grouped import collate_shared_prompt
    from posttrain.train.preference import batch_logps

    items = _items()
    sequences = [s for it in items for s in it.sequences]
    model, ref = _pair(name, lean=True)
    plain = copy.deepcopy(ref)
    assert _swiglu_is_lean(model)
    _fast(model, checkpointing=True)
    weights = torch.linspace(1, 2, len(sequences), dtype=torch.float64)
    ref.zero_grad()
    alone = torch.stack([sum(lp[t - 1, tok] for t, tok in enumerate(s.labels) if t > 0 and tok != -100)
                         for s in sequences for lp in [_alone_log_softmax(ref, s.input_ids)]])
    (alone * weights).sum().backward()
    plain.zero_grad()
    shared = batch_logps(plain, collate_shared_prompt(items, PAD, 0), 3)[0]
    (shared * weights).sum().backward()
    model.zero_grad()
    got, counts = batch_logps(model, collate_shared_prompt(items, PAD, 0, padding_free=True), 3)
    (got * weights).sum().backward()
    assert counts.tolist() == [sum(t != -100 for t in s.labels) for s in sequences]
    assert torch.allclose(got.detach(), alone.detach(), rtol=0, atol=1e-12)
    _close_grads(_grads(model), _grads(plain), what=f"{name} vs the padded shared layout")
    for a, b in zip(_grads(model), _grads(ref)):  # float32 rounding in the norm's backward, relative to the whole
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-12, f"{name} vs alone"


# --------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize("kind, window, extra, applies", [
    ("mistral", LONGEST, {}, True),  # the longest row fills the window exactly
    ("mistral", LONGEST - 1, {}, False),
    ("qwen2", 4, {"use_sliding_window": True, "max_window_layers": 1}, False),  # layer 1 windowed
    ("qwen2", 4, {"use_sliding_window": True, "max_window_layers": 2}, True),  # no layer windowed
    ("qwen3", 4, {"use_sliding_window": True, "max_window_layers": 0, "head_dim": 8}, False),
])
def test_sliding_windows_at_and_below_the_longest_row(kind, window, extra, applies):
    """Padding-free attention ignores a sliding window, so it may only run when every sequence
    fits the window (or no layer has one); otherwise the model keeps its own (windowed) masks and
    the log says why. Either way DPO rows, RL completions and the reward model give each row's
    own values, the rows longer than a 4-token window included."""
    from posttrain.models.reward_model import score
    from posttrain.train.preference import policy_logps
    from posttrain.train.rollouts import collate_completions, completion_forward

    table = {"m": (kind, {"sliding_window": window, **extra})}
    model = _lm("m", table)
    ref = copy.deepcopy(model)
    heard = []
    assert padding_free(model, log=heard.append, longest=LONGEST) == applies
    assert trims_last_layer(model) == applies and takes_padding_free(model) == applies
    if applies:
        assert heard == []
    else:
        assert heard == [(f"note: model.padding_free is off: the model attends within a {window}-token window and "
                         f"sequences may hold {LONGEST} tokens; batches use the model's own masks")]
    with torch.no_grad():
        alone = _alone_completion_logps(ref)
        for side in ("right", "left"):
            ids, mask, labels = _rows(side)
            got = policy_logps(model, ids, labels, mask)[0]
            assert torch.allclose(got, torch.stack([x.sum() for x in alone]), rtol=0, atol=1e-12), side
        batch = collate_completions(PROMPTS, COMPLETIONS, pad_id=PAD)
        logps = completion_forward(model, batch)["logps"]
        for i, x in enumerate(alone):
            assert torch.allclose(logps[i, :len(x)], x, rtol=0, atol=1e-12)
    rm = _rm("m", table)
    rm_ref = copy.deepcopy(rm)
    assert padding_free(rm, longest=LONGEST) == applies
    ids, mask, _ = _rows("left")
    with torch.no_grad():
        expected = torch.stack([rm_ref(input_ids=torch.tensor([p + c])).logits[0, 0]
                                for p, c in zip(PROMPTS, COMPLETIONS)]).float()
        assert torch.allclose(score(rm, ids, mask), expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- families that fall back


@pytest.mark.parametrize("name", list(FALLBACK))
def test_gpt2_and_opt_fall_back_say_so_and_still_equal_each_row_alone(name):
    """GPT-2 and OPT: padding-free does not apply (and the log says which model), no layer is
    trimmed, lean changes nothing; their preference rows (either padding side) and RL
    completions go padded and still equal each row alone, gradients included."""
    from posttrain.train.preference import policy_logps
    from posttrain.train.rollouts import collate_completions, completion_forward

    model, ref = _pair(name, FALLBACK)
    assert lean_activations(model.float(), True) == 0
    model.double()
    heard = []
    assert not padding_free(model, log=heard.append, longest=LONGEST)
    kind = FALLBACK[name][0]
    assert heard == [(f"note: model.padding_free does not apply to this model ({kind}, sdpa attention); "
                     "batches keep their padding")]
    assert not takes_padding_free(model) and not trims_last_layer(model)
    assert model.config._attn_implementation == "sdpa"
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    ref.zero_grad()
    alone = _alone_completion_logps(ref)
    (torch.stack([x.sum() for x in alone]) * weights).sum().backward()
    want = _grads(ref)
    for side in ("right", "left"):
        ids, mask, labels = _rows(side)
        model.zero_grad()
        got = policy_logps(model, ids, labels, mask, chunk_size=3)[0]
        (got * weights).sum().backward()
        assert torch.allclose(got.detach(), torch.stack([x.sum() for x in alone]).detach(), rtol=0, atol=1e-12), side
        _close_grads(_grads(model), want, what=f"{name} {side}")
    with torch.no_grad():
        logps = completion_forward(model, collate_completions(PROMPTS, COMPLETIONS, pad_id=PAD))["logps"]
        for i, x in enumerate(alone):
            assert torch.allclose(logps[i, :len(x)], x.detach(), rtol=0, atol=1e-12)


def test_lean_leaves_an_mlp_that_is_not_swiglu_alone():
    """A Llama with a GELU MLP: lean changes its norms only (the activation check refuses the MLP,
    whose lean forward would hard-code SiLU), and DPO rows through every fast path still equal
    each row alone."""
    from posttrain.train.preference import policy_logps

    silu = _lm("llama_tied", lean=True)
    assert _swiglu_is_lean(silu)  # the same float32 model with SiLU: its MLPs are taken
    model, ref = _pair("llama_tied", lean=True, hidden_act="gelu")
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    assert all(isinstance(layer.input_layernorm.__dict__.get("forward"), functools.partial)
               for layer in model.model.layers)  # the norms are
    _fast(model, checkpointing=True)
    ref.zero_grad()
    expected = torch.stack([x.sum() for x in _alone_completion_logps(ref)])
    expected.sum().backward()
    ids, mask, labels = _rows("left")
    model.zero_grad()
    got = policy_logps(model, ids, labels, mask)[0]
    got.sum().backward()
    assert torch.allclose(got.detach(), expected.detach(), rtol=0, atol=1e-12)
    _close_grads(_grads(model), _grads(ref), what="gelu")


# --------------------------------------------------------------------------- heads that are not plain


def _transformed_head(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64}
    extra = {"falcon_h1": {"mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_n_groups": 1,
                           "mamba_d_state": 8, "lm_head_multiplier": 0.25},
             "recurrent_gemma": {"lru_width": 32, "attention_window_size": 16,
                                 "block_types": ["recurrent", "attention"], "logits_soft_cap": 0.5}}[kind]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **extra)).double().eval()


@pytest.mark.parametrize("kind", ["falcon_h1", "recurrent_gemma"])
def test_a_head_that_scales_or_caps_its_logits_falls_back_to_the_model_s_own_logits(kind):
    """`final_hidden_and_head` promises hidden @ Wᵀ == the model's logits and to raise for
    "models whose logits are scaled or soft-capped"; `supports_hidden_path` decides by a list of
    config fields. Falcon-H1 multiplies its logits by `lm_head_multiplier` (its released configs
    set it well below 1) and RecurrentGemma soft-caps them at `logits_soft_cap`; neither field is
    on the list, so SFT's chunked loss (train.loss=auto) trains on logits the model never
    produces, silently. The expected loss is transformers' own: cross-entropy of model(...).logits."""
    from posttrain.train.sft import CausalLMLoss

    model = _transformed_head(kind)
    ids = torch.tensor([[3, 9, 14, 22, 5, 41, 7]])
    labels = ids.clone()
    labels[0, :2] = -100
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
        expected = torch.nn.functional.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        got = CausalLMLoss(model, "auto", chunk_size=3)(ids, labels)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10), f"{got.item():.6f} vs {expected.item():.6f}"


def test_an_output_layer_nested_in_a_head_block_falls_back_to_the_model_s_own_logits():
    """BERT-like *LMHeadModel loaded as a causal LM: its Linear decoder sits behind a dense + GELU +
    LayerNorm transform (cls.predictions), so hidden @ Wᵀ is not its logits: the full-logits path."""
    from transformers import BertConfig, BertLMHeadModel

    from posttrain.models.loading import _unsupported_reason, supports_hidden_path

    torch.manual_seed(0)
    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, is_decoder=True)).eval()
    assert not supports_hidden_path(model)
    assert "sits inside cls.predictions" in _unsupported_reason(model)

"""Stop 34, forgetting backlog: pins the rules of train/forgetting.py and train/retain_terms.py that
earlier sessions noticed and left alone:

  - EWC's Fisher squares the gradient of each row's SUMMED token loss, −log p(y|x) (Kirkpatrick et
    al. 2017), not of its token mean (which weighs a row of n tokens by 1/n²);
  - LwF's distillation at a temperature T: T²·KL(q_T ‖ p_T) (Li & Hoiem 2017, Hinton et al. 2015);
  - a retain prompt that appears more than once lands on one side of the pool / held-out split;
  - retain exact match scores only held-out rows the retain loss reads.
"""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.records import IGNORE_INDEX, Example


class _Acc:
    """What fisher_diagonal and RetainTerms read of an accelerator, for one process."""
    process_index, num_processes, device = 0, 1, torch.device("cpu")

    @staticmethod
    def reduce(tensor, op):
        return tensor

    @staticmethod
    def autocast():
        import contextlib

        return contextlib.nullcontext()


class _Bigram(torch.nn.Module):
    """A 2-token bigram table in float64, whose forward is CausalLMLoss's: the summed token loss."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))

    def forward(self, input_ids, labels, attention_mask=None):
        logits = self.table[input_ids[:, :-1]]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")


# --------------------------------------------------------------------------- 1. EWC's Fisher


def test_fisher_squares_the_gradient_of_each_rows_summed_log_likelihood():
    """By hand, at W = 0 (p = ½, ½; ∂(−log p_y)/∂z = p − e_y): row A predicts 1 after 0 and 0 after 1
    (∇W = ±½ in every entry), row B predicts 0 after 0 three times (∇W₀ = 3·(−½, ½), ∇W₁ = 0).
    Mean of the squares: W₀ (0.25 + 2.25)/2 = 1.25, W₁ 0.25/2 = 0.125; scaled to mean 1 (÷ 0.6875):
    20/11 and 2/11. The token-mean loss would give 5/3 and 1/3 (B's three tokens weighed 1/9)."""
    from posttrain.train.forgetting import fisher_diagonal

    model = _Bigram()
    rows = [Example([0, 1, 0], [IGNORE_INDEX, 1, 0]), Example([0, 0, 0, 0], [IGNORE_INDEX, 0, 0, 0])]
    fisher = fisher_diagonal(model, rows, [model.table], pad_id=0, accelerator=_Acc())
    want = torch.tensor([[20 / 11, 20 / 11], [2 / 11, 2 / 11]], dtype=torch.float64)
    torch.testing.assert_close(fisher[0], want, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- 2. LwF's temperature


def _distill_cfg(temperature: float, **more):
    """forgetting.* for RetainTerms, with distill_temperature set."""
    import dataclasses
    from types import SimpleNamespace

    from posttrain.config import ForgettingConfig

    base = ForgettingConfig(retain_files=["retain.jsonl"], distill=1.0, **more)
    return SimpleNamespace(**{**dataclasses.asdict(base), "distill_temperature": temperature})


def _rows(n=4, seed=0, vocab=1024, pad=3):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(pad + 1, vocab, (int(torch.randint(5, 9, (1,), generator=gen)),), generator=gen).tolist()
        rows.append(Example(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return rows


@pytest.fixture(scope="module")
def tiny64():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model

    torch.manual_seed(0)
    return load_model(ModelConfig(path="tiny-2l")).double()


@pytest.mark.parametrize("hidden_path", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_distillation_is_t_squared_kl_of_the_softened_distributions(tiny64, monkeypatch, temperature, hidden_path):
    """distill_kl = Σ T²·KL(q_T ‖ p_T) / label tokens over the step's retain rows, q_T = softmax(z₀/T)
    and p_T = softmax(z/T) read over q_T's top k tokens and one bucket for the rest (q_T's top k
    stored in float32), its gradient that of the same plain float64 formula from full logits, and
    retain_lm_loss the LM loss at T = 1 whatever T: on the chunked head path and on the full
    log-probs path alike."""
    import copy

    from posttrain.train.retain_terms import RetainTerms

    if not hidden_path:
        monkeypatch.setattr("posttrain.models.loading.supports_hidden_path", lambda model: False)
    model, teacher = copy.deepcopy(tiny64), copy.deepcopy(tiny64)
    rows, k = _rows(), 6
    terms = RetainTerms(_distill_cfg(temperature, distill_top_k=k, retain_batch_size=len(rows)), rows, model,
                        pad_id=3, batch_size=2, seed=1, chunk_size=4)
    terms.compute_teacher(_Acc())
    with torch.no_grad():  # the student moves away from the teacher
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)

    total = sum(r.num_label_tokens for r in rows)
    ce = kl = 0.0
    for row in rows:
        ids, targets = torch.tensor([row.input_ids]), torch.tensor(row.labels[1:])
        kept = targets != IGNORE_INDEX
        z = model(input_ids=ids).logits[0, :-1][kept]
        with torch.no_grad():
            z0 = teacher(input_ids=ids).logits[0, :-1][kept]
        ce = ce - z.log_softmax(-1).gather(1, targets[kept][:, None]).sum()
        top = (z0 / temperature).log_softmax(-1).topk(k, dim=-1)
        log_q = top.values.float().double()  # as stored
        q, log_p = log_q.exp(), (z / temperature).log_softmax(-1)
        q_rest = 1.0 - q.sum(-1)
        log_p_rest = log_p.scatter(1, top.indices, float("-inf")).logsumexp(-1)
        kl = kl + temperature ** 2 * ((q * (log_q - log_p.gather(1, top.indices))).sum()
                                      + (q_rest * (q_rest.log() - log_p_rest)).sum())
    want = torch.autograd.grad(kl / total, params)

    figures = terms.apply(params, 1.0, _Acc(), step=0)

    assert figures["retain_lm_loss"] == pytest.approx(float(ce.detach()) / total, rel=1e-6)
    # the teacher's log-probs are stored in float32, and the full log-probs path works in float32
    rel = 1e-5 if hidden_path else 1e-4
    assert figures["distill_kl"] == pytest.approx(float(kl.detach()) / total, rel=rel) and float(kl.detach()) > 1e-4
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=rel, atol=rel * float(w.abs().max()))


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_a_temperature_that_is_not_positive_is_refused(value):
    from posttrain.config import SFTConfig
    from posttrain.config.sections import validate_sft
    from posttrain.errors import ConfigError

    cfg = SFTConfig.from_dict({"model": {"path": "tiny"}, "data": {"train_files": ["synthetic"]},
                               "forgetting": {"distill_temperature": value}})
    with pytest.raises(ConfigError, match="distill_temperature must be above 0"):
        validate_sft(cfg)


# --------------------------------------------------------------------------- 3, 4. the retain split


def _retain(tmp_path, rows: list[dict], **data):
    """prepare_retain_data on `rows` (alpaca) as an sft run with the tiny preset reads them: (RetainData,
    {source: row})."""
    from posttrain.config import SFTConfig
    from posttrain.models.loading import load_tokenizer
    from posttrain.train.forgetting import prepare_retain_data

    path = tmp_path / "retain.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["reverse"], "max_length": 64} | data,
        "train": {"seed": 0},
        "forgetting": {"retain_files": [str(path)], "retain_eval_fraction": 0.25, "retain_exact_match": 10}})
    retain = prepare_retain_data(cfg, load_tokenizer("tiny"), None, 0, lambda *a: None)
    by_source = {f"{path}:{i + 1}": row for i, row in enumerate(rows)}
    return retain, by_source


def test_a_prompt_given_more_than_once_is_held_out_or_in_the_pool_never_both(tmp_path):
    """20 prompts, each with 3 answers: every held-out prompt's rows are all held out (the share is
    still ~25%), and the pool holds none of them."""
    rows = [{"instruction": f"Name a letter after {chr(97 + i)}", "output": f"{chr(98 + i)} {j}"}
            for i in range(20) for j in range(3)]
    retain, by_source = _retain(tmp_path, rows)
    held = [by_source[e.source]["instruction"] for e in retain.held_out]
    pool = [by_source[e.source]["instruction"] for e in retain.pool]
    assert not set(held) & set(pool)
    assert sorted(held) == sorted(p for p in set(held) for _ in range(3)) and len(held) == 15
    assert len(pool) + len(held) == 60


def test_retain_exact_match_scores_only_rows_the_retain_loss_reads(tmp_path):
    """Under data.overlength=drop, held-out rows past max_length leave the retain loss; exact match
    leaves them out too: both read the same held-out rows."""
    rows = [{"instruction": f"Copy: {chr(97 + i % 26)}", "output": " ".join("abcdefgh"[: 1 + i % 8] * (1 + 6 * (i % 3 == 0)))}
            for i in range(40)]
    retain, by_source = _retain(tmp_path, rows, max_length=24, overlength="drop")
    measured = [e.source for e in retain.held_out]
    scored = [r.source for r in retain.held_out_records]
    held_rows = 10  # round(0.25 · 40), some of them dropped for length
    assert len(measured) < held_rows and scored == measured

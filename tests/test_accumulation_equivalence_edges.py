"""Review: one optimizer step over a batch split into k micro-batches is the step of the whole batch.

Every stage's loss goes through `train.loop._train_step` (or the whole `train.loop.train`), which
divides each micro-batch's summed loss by the weight of the WHOLE step (label tokens for SFT,
prompts for the reward and DPO stages). Here that is checked in float64 on a small random Llama
(so structural errors stand out from rounding: 1e-10), over uneven micro-batches (a micro-batch of
one row, rows of very different label counts, padding, packed rows, shared-prompt rows, pairs and
K-way rankings in one step), against the loss written out plainly: each sequence alone through the
plain transformers forward, full log-softmax, the per-prompt weights spelled out by hand, the
optimizer torch's own AdamW.

Where the product rounds to float32 on purpose — reward scores (`scores_at`), the precomputed
reference log-probs and the 1/#pairs weights (float32 tensors), KTO's z₀ — the comparison with the
independent float64 value uses a tolerance of that rounding, while two splits of the same step
through the product are still compared at 1e-10.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.data.records import IGNORE_INDEX, Example

PAD = 0
VOCAB = 64


# --------------------------------------------------------------------------- small models, data, helpers


def _config(**extra):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=PAD, **extra)


def _lm(seed: int = 0, tied: bool = False):
    """A float64 two-layer Llama (untied by default: the loop's sparse embedding path is exercised)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(tie_word_embeddings=tied), attn_implementation="sdpa").double()


def _rm(seed: int = 0):
    """A float64 two-layer Llama reward model (one output)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(_config(num_labels=1), attn_implementation="sdpa")
    return model.double()


def _accelerator(tmp_path):
    from posttrain.config.sections import TrainConfig
    from posttrain.train.runs import make_accelerator

    return make_accelerator(TrainConfig(), tmp_path)


class _NoClip:
    max_grad_norm = 0.0


def _toks(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=g).tolist()


def _sft_examples() -> list[Example]:
    """Seven examples: prompt lengths 0..14, response lengths 1..20, one with a masked middle (a
    second user turn), one text row that trains on every token."""
    g = torch.Generator().manual_seed(11)
    out = []
    for prompt, response in [(3, 5), (10, 1), (1, 20), (6, 6), (2, 2), (14, 9), (4, 12)]:
        ids = _toks(g, prompt + response)
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], f"sft:{len(out)}"))
    ids = out[6].input_ids
    out[6] = Example(ids, out[6].labels[:8] + [IGNORE_INDEX] * 4 + ids[12:], "sft:6")  # a masked middle
    out[4] = Example(out[4].input_ids, list(out[4].input_ids), "sft:4")  # text: every token trained
    return out


def _token_nll(model, example: Example):
    """(Σ −log p(label_t | tokens < t) over labelled t ≥ 1, their count): one unpadded sequence, full logits."""
    logp = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0].double().log_softmax(-1)
    total, count = logp.new_zeros(()), 0
    for t in range(1, len(example.labels)):
        if example.labels[t] != IGNORE_INDEX:
            total = total - logp[t - 1, example.labels[t]]
            count += 1
    return total, count


def _seq_logp(model, example: Example):
    nll, count = _token_nll(model, example)
    return -nll, count


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict, want: dict, rel: float):
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 1e-6  # the check has teeth
    for name, g in want.items():
        have = got.get(name, torch.zeros_like(g))
        err = float((have.double() - g.double()).abs().max())
        assert err <= rel * scale, (name, err, scale)
    extra = set(got) - set(want)
    assert all(float(got[n].abs().max()) == 0.0 for n in extra), extra


def _norm(grads: dict) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


# --------------------------------------------------------------------------- SFT: one step, uneven micro-batches


SFT_SPLITS = {"whole": [[0, 1, 2, 3, 4, 5, 6]], "3+1+3": [[0, 1, 2], [3], [4, 5, 6]],
              "singletons": [[i] for i in range(7)]}


def _sft_micro(examples, groups, packing: bool, max_length: int = 24):
    from posttrain.data.batching import collate, collate_packed, pack

    if packing:  # each micro-batch's examples packed into rows of ≤ max_length tokens (several per row)
        return [collate_packed(pack([examples[i] for i in g], max_length), PAD) for g in groups]
    return [collate([examples[i] for i in g], PAD) for g in groups]


@pytest.fixture(scope="module")
def sft_reference():
    """The whole batch's mean token NLL (all 7 examples, each alone), its gradient and norm, float64."""
    model = _lm()
    examples = _sft_examples()
    total, count = 0.0, 0
    for e in examples:
        nll, n = _token_nll(model, e)
        total, count = total + nll, count + n
    (total / count).backward()
    grads = _grads(model)
    return float(total.detach() / count), grads, count


@pytest.mark.parametrize("loss_kind", ["chunked", "plain"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("split", list(SFT_SPLITS))
def test_sft_step_over_any_split_is_the_whole_batch_token_mean(tmp_path, sft_reference, loss_kind, packing, split):
    """Micro-batches of 3 + 1 + 3 rows or 7 singletons (padded, or packed several examples to a
    row): the loss and every gradient equal those of Σ token NLL / Σ label tokens over the whole batch,
    each example through the plain forward alone, to 1e-10 in float64."""
    from posttrain.train.loop import _train_step
    from posttrain.train.sft import CausalLMLoss, SFTStage

    expected_loss, expected_grads, count = sft_reference
    model = _lm()
    module = CausalLMLoss(model, loss=loss_kind, chunk_size=5)
    stage = SFTStage.__new__(SFTStage)
    micro = _sft_micro(_sft_examples(), SFT_SPLITS[split], packing)
    if packing and split == "whole":
        assert len(micro[0]["input_ids"]) < 7  # several examples share a row
    assert sum(stage.weight(b) for b in micro) == count
    loss, grad_norm, metrics = _train_step(module, stage, micro, _accelerator(tmp_path), _NoClip())
    assert metrics == {}
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    assert grad_norm == pytest.approx(_norm(expected_grads), rel=1e-10)
    _assert_grads_close(_grads(model), expected_grads, 1e-10)


# --------------------------------------------------------------------------- SFT: whole runs through train()


def _sft_stage(examples, groups, packing, cfg_train):
    """An SFTStage whose epoch is the fixed micro-batches `groups` (uneven, the last a partial one):
    the loop's accumulation, top-up and normalisation are what is under test, not the shuffle."""
    from posttrain.config import SFTConfig
    from posttrain.train.sft import CausalLMLoss, SFTStage

    cfg = SFTConfig.from_dict({"data": {"packing": packing}, "train": cfg_train})
    module = CausalLMLoss(_lm(), loss="chunked", chunk_size=7)
    stage = SFTStage(module, examples, [], cfg, PAD)
    stage.micro_batches = lambda epoch: iter(_sft_micro(examples, groups, packing))
    stage.micro_batches_per_epoch = lambda: len(groups)
    return stage, cfg


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_run_with_a_partial_last_micro_batch_and_a_topped_up_step_equals_torch_adamw(tmp_path, packing):
    """One epoch of micro-batches [3, 1, 2, 1 rows], accumulation 3: step 1 takes the first three
    (examples 0-5), step 2 the last (example 6) topped up with the epoch's first two micro-batches
    (examples 0-3 again), as `loop._steps` documents. Each step is AdamW on the whole step's token
    mean, clipped at 0.05 on the whole step's norm: the logged loss and grad norm, the epoch, and the
    weights after both steps equal torch's AdamW and clip_grad_norm_ on the plain float64 loss."""
    from posttrain.train.loop import train
    from posttrain.train.runs import make_accelerator

    examples = _sft_examples()
    groups = [[0, 1, 2], [3], [4, 5], [6]]
    lr, eps, clip = 3e-3, 1e-6, 0.05
    cfg_train = {"batch_size": 3, "grad_accum": 3, "epochs": 1, "lr": lr, "adam_eps": eps, "schedule": "constant",
                 "max_grad_norm": clip, "progress_bar": False, "resume": "never", "weight_decay": 0.0}
    stage, cfg = _sft_stage(examples, groups, packing, cfg_train)
    reference = copy.deepcopy(stage.module.model)
    run_dir = tmp_path / "run"
    result = train(stage, cfg.train, run_dir, make_accelerator(cfg.train, run_dir))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and [r["epoch"] for r in steps] == [0.75, 1.0]  # epochs read

    optimizer = torch.optim.AdamW(reference.parameters(), lr=lr, eps=eps, weight_decay=0.0)
    for record, rows in zip(steps, [[0, 1, 2, 3, 4, 5], [6, 0, 1, 2, 3]]):
        total, count = 0.0, 0
        for i in rows:
            nll, n = _token_nll(reference, examples[i])
            total, count = total + nll, count + n
        (total / count).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(list(reference.parameters()), clip))
        assert norm > clip  # clipping acts
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert record["loss"] == pytest.approx(float(total.detach()) / count, rel=1e-11)
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-9)
    trained = dict(result.module.model.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.allclose(trained[name], p, rtol=0, atol=1e-10), name


def test_sft_logged_tokens_of_packed_rows_count_every_real_token_when_pad_is_eos(tmp_path):
    """`Stage.tokens` is "real (non-padding) tokens in the batch" (loop.py), logged as `tokens` and
    `tokens_per_s`. `load_tokenizer` makes EOS the pad token when a tokenizer has none (Llama 3,
    Mistral, GPT-2, ...), and every SFT example ends with its EOS. The same examples padded count
    every token; packed, the count must be the same."""
    from posttrain.data.batching import collate, collate_packed, pack
    from posttrain.train.sft import SFTStage

    eos = 2
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (5, 9, 3, 7):
        ids = [t if t != eos else 5 for t in _toks(g, n)] + [eos]  # each ends with EOS, no other EOS inside
        examples.append(Example(ids, [IGNORE_INDEX] * 2 + ids[2:], "t"))
    real = sum(len(e) for e in examples)
    stage = SFTStage.__new__(SFTStage)
    stage.pad_id = eos  # the fallback pad
    assert stage.tokens(collate(examples, eos)) == real
    assert stage.tokens(collate_packed(pack(examples, 32), eos)) == real


# --------------------------------------------------------------------------- reward models


def _item(g, prompt: int, responses: list[int], ranks, margin=None):
    from posttrain.train.grouped import Item

    head = _toks(g, prompt)
    seqs = []
    for r in responses:
        tail = _toks(g, r)
        seqs.append(Example(head + tail, [IGNORE_INDEX] * prompt + tail, "p"))
    return Item(seqs, list(ranks), margin=margin)


def _ranked_items():
    """Pairs with margins (one whose second response is the better), a 3-way ranking with a tie, a
    4-way ranking, a pair, a 3-way ranking in reverse order: uneven prompts and responses."""
    g = torch.Generator().manual_seed(5)
    return [_item(g, 3, [2, 5], [0, 1], 1.5), _item(g, 7, [1, 1], [1, 0], 0.5), _item(g, 2, [4, 3, 6], [0, 0, 1]),
            _item(g, 5, [2, 2, 3, 8], [0, 1, 2, 3]), _item(g, 1, [9, 2], [0, 1], 2.0), _item(g, 4, [3, 3, 3], [2, 1, 0])]


# micro-batches: pairs only (Bradley-Terry path) then rankings; one prompt then four; everything at once
RM_SPLITS = {"pairs_first": [[0, 1], [2, 3], [4, 5]], "1+4+1": [[0], [1, 2, 3, 4], [5]], "whole": [[0, 1, 2, 3, 4, 5]]}


def _rm_reference(model, items, centering):
    """InstructGPT per-prompt loss (Bradley-Terry with the pair's margin for K = 2), each prompt
    weighted once, plus the per-prompt metrics, each response scored alone at its last token."""
    loss, acc, margin, mean, sq = 0.0, 0.0, 0.0, 0.0, 0.0
    for item in items:
        r = [model(input_ids=torch.tensor([s.input_ids])).logits[0, 0] for s in item.sequences]
        pairs = [(i, j) for i in range(len(r)) for j in range(len(r)) if item.ranks[i] < item.ranks[j]]
        m = (item.margin or 0.0) if len(r) == 2 else 0.0
        loss = loss + sum(-F.logsigmoid(r[i] - r[j] - m) for i, j in pairs) / len(pairs)
        loss = loss + centering * (2 * sum(r) / len(r)) ** 2
        rv = [float(x.detach()) for x in r]
        acc += sum(1.0 if rv[i] > rv[j] else 0.5 if rv[i] == rv[j] else 0.0 for i, j in pairs) / len(pairs)
        margin += sum(rv[i] - rv[j] for i, j in pairs) / len(pairs)
        mean += sum(rv) / len(rv)
        sq += sum(x * x for x in rv) / len(rv)
    n = len(items)
    metrics = {"accuracy": acc / n, "margin": margin / n, "reward_mean": mean / n,
               "reward_std": math.sqrt(sq / n - (mean / n) ** 2)}
    return loss / n, metrics


@pytest.fixture(scope="module")
def rm_reference():
    model = _rm()
    loss, metrics = _rm_reference(model, _ranked_items(), 0.05)
    loss.backward()
    return float(loss.detach()), metrics, _grads(model)


@pytest.mark.parametrize("share", [False, True], ids=["rows", "shared_prompt"])
@pytest.mark.parametrize("split", list(RM_SPLITS))
def test_reward_model_step_over_any_split_is_the_whole_batch_per_prompt_average(tmp_path, rm_reference, share, split):
    """Pairs (with Llama-2 margins) and K-way rankings (a tie, K = 2..4) with centering 0.05, split
    into a pairs-only micro-batch (the Bradley-Terry branch) and ranking ones, 1 + 4 + 1 prompts, or
    whole: loss, every gradient, accuracy, margin, reward mean and std equal the per-prompt averages
    over the whole step (scores are float32 by design: 1e-6)."""
    from posttrain.config.sections import TrainConfig
    from posttrain.train.grouped import GroupedStage
    from posttrain.train.loop import _train_step
    from posttrain.train.reward import RewardModelLoss, finish_reward_metrics, reward_extras

    expected_loss, expected_metrics, expected_grads = rm_reference
    model = _rm()
    items = _ranked_items()
    module = RewardModelLoss(model, centering=0.05, use_margins=True)
    stage = GroupedStage(module, items, [], TrainConfig(batch_size=4), PAD, reward_extras, share_prompt=share)
    stage.finish_metrics = finish_reward_metrics
    micro = [stage.collate([items[i] for i in g]) for g in RM_SPLITS[split]]
    assert share == all("last_token" in b for b in micro)
    loss, grad_norm, metrics = _train_step(module, stage, micro, _accelerator(tmp_path), _NoClip())
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert set(metrics) == set(expected_metrics)
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert grad_norm == pytest.approx(_norm(expected_grads), rel=1e-6)
    _assert_grads_close(_grads(model), expected_grads, 1e-6)


# --------------------------------------------------------------------------- DPO family


def _with_reference(items, model, offsets=True):
    """Reference log-probs = the starting policy's (each sequence alone) + a varied offset, rounded to
    float32 as the product stores them, so rewards are not 0."""
    with torch.no_grad():
        for k, item in enumerate(items):
            item.reference_logps = [
                float(torch.tensor(float(_seq_logp(model, s)[0]) + (0.3 * ((k + j) % 3 - 1) if offsets else 0.0))
                      .float()) for j, s in enumerate(item.sequences)]
    return items


def _pair_reference(model, items, c):
    """Per-prompt average of the paper's per-pair loss, each ordered pair 1/#pairs, plus the metrics;
    ORPO's NLL term once per prompt, on its best response(s) (stop 32)."""
    loss, sums = 0.0, {}

    def add(name, value):
        sums[name] = sums.get(name, 0.0) + value

    for item in items:
        stats = [_seq_logp(model, s) for s in item.sequences]
        logp = [t for t, _ in stats]
        avg = [t / n for t, n in stats]
        ref = item.reference_logps
        pairs = [(i, j) for i in range(len(logp)) for j in range(len(logp)) if item.ranks[i] < item.ranks[j]]
        for i, j in pairs:
            w = 1.0 / len(pairs)
            h = (logp[i] - ref[i]) - (logp[j] - ref[j])
            if c.loss == "dpo":
                term = -F.logsigmoid(c.beta * h)
                rc, rr = c.beta * float((logp[i] - ref[i]).detach()), c.beta * float((logp[j] - ref[j]).detach())
            else:  # orpo: reference-free, on average log-probs; its NLL term below
                odds = [a - torch.log(-torch.expm1(a)) for a in (avg[i], avg[j])]
                term = -c.orpo_lambda * F.logsigmoid(odds[0] - odds[1])
                rc, rr = c.beta * float(avg[i].detach()), c.beta * float(avg[j].detach())
                add("log_odds_ratio", w * float((odds[0] - odds[1]).detach()))
            loss = loss + w * term
            add("rewards/chosen", w * rc)
            add("rewards/rejected", w * rr)
            add("rewards/margins", w * (rc - rr))
            add("rewards/accuracy", w * (1.0 if rc > rr else 0.5 if rc == rr else 0.0))
            add("logps/chosen", w * float(logp[i].detach()))
            add("logps/rejected", w * float(logp[j].detach()))
        if c.loss == "orpo":  # the SFT term: the mean token NLL of the best response(s), once per prompt
            best = [k for k, rank in enumerate(item.ranks) if rank == min(item.ranks)]
            nll = sum(-avg[k] for k in best) / len(best)
            loss = loss + nll
            add("nll", float(nll.detach()))
    n = len(items)
    return loss / n, {k: v / n for k, v in sums.items()}


def _dpo_cases():
    from posttrain.config import DPOLossConfig

    return {"dpo": DPOLossConfig(loss="dpo", beta=0.3), "orpo": DPOLossConfig(loss="orpo", beta=0.3, orpo_lambda=0.7)}


DPO_SPLITS = {"whole": [[0, 1, 2, 3, 4, 5]], "1+4+1": [[0], [1, 2, 3, 4], [5]], "singletons": [[i] for i in range(6)]}


@pytest.mark.parametrize("share", [False, True], ids=["rows", "shared_prompt"])
@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_dpo_family_step_over_any_split_is_the_whole_batch_per_prompt_average(tmp_path, name, share):
    """Pairs and K-way rankings (a tie; one in reverse order), as one micro-batch, 1 + 4 + 1 prompts or
    six singletons: every split gives the same loss, gradients and metrics to 1e-10 in float64, and
    they are the per-prompt averages of the paper's loss over the whole step (to the float32 rounding
    of the 1/#pairs weights and the stored reference log-probs)."""
    from posttrain.config.sections import TrainConfig
    from posttrain.train.grouped import GroupedStage
    from posttrain.train.loop import _train_step
    from posttrain.train.preference import PreferenceLoss, pair_extras

    c = _dpo_cases()[name]
    reference_model = _lm(tied=True)
    items = _with_reference(_ranked_items(), reference_model)
    expected_loss, expected_metrics = _pair_reference(reference_model, items, c)
    expected_loss.backward()
    expected_grads = _grads(reference_model)
    assert abs(expected_metrics["rewards/margins"]) > 1e-3

    runs = {}
    for split, groups in DPO_SPLITS.items():
        model = _lm(tied=True)
        module = PreferenceLoss(model, c, chunk_size=5)
        stage = GroupedStage(module, items, [], TrainConfig(batch_size=4), PAD, pair_extras, share_prompt=share)
        micro = [stage.collate([items[i] for i in g]) for g in groups]
        assert share == all("predictor" in b for b in micro)
        loss, grad_norm, metrics = _train_step(module, stage, micro, _accelerator(tmp_path), _NoClip())
        runs[split] = (loss, grad_norm, metrics, _grads(model))
    whole = runs["whole"]
    for split, (loss, grad_norm, metrics, grads) in runs.items():
        assert loss == pytest.approx(whole[0], rel=1e-11), split
        assert grad_norm == pytest.approx(whole[1], rel=1e-10), split
        assert metrics == pytest.approx(whole[2], rel=1e-6, abs=1e-9), split  # accuracy is summed in float32
        _assert_grads_close(grads, whole[3], 1e-10)
    loss, grad_norm, metrics, grads = whole
    assert loss == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    assert set(metrics) == set(expected_metrics)
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    _assert_grads_close(grads, expected_grads, 1e-6)


# --------------------------------------------------------------------------- KTO


def _kto_items(model):
    """KTO items from pairs and rankings (`kto_items`: the best desirable, the worst not, each with a
    mismatched partner), reference = policy + offsets chosen so the mismatched rows' log-ratio is
    +2.2 on average over the first 4 items and −1 over the other 7: z₀ over all 11 is 1.8 / 11, while
    a micro-batch of the last items alone would clamp its own estimate at 0 and one of the first
    would take ~2.2."""
    from posttrain.train.preference import kto_items

    items = kto_items(_ranked_items()[:5], 64, lambda *_: None)  # 2 + 2 + 3 + 2 (the 4-way's ends) + 2
    with torch.no_grad():
        for k, item in enumerate(items):
            own, other = (float(_seq_logp(model, s)[0]) for s in item.sequences)
            shift = (-(1.0 + 0.8 * k) if k < 4 else 1.0)  # mean of the first four: −2.2
            item.reference_logps = [float(torch.tensor(own + 0.25 * (k % 3 - 1)).float()),
                                    float(torch.tensor(other + shift).float())]
    return items


KTO_SPLITS = {"whole": [list(range(11))], "singletons": [[i] for i in range(11)], "3+8": [[0, 1, 2], list(range(3, 11))],
              "4+7": [[0, 1, 2, 3], list(range(4, 11))]}


def test_kto_step_uses_z0_of_the_whole_step_for_any_split(tmp_path):
    """README: "KTO's KL estimate z₀ is the mean over the mismatched rows of the whole optimizer step
    (every micro-batch and process) ... so batch 8 and batch 1 × 8 accumulated take the same step".
    11 items as one micro-batch, 11 singletons, 3 + 8 or 4 + 7 (where each micro-batch alone would
    estimate z₀ ≈ 2.2 and 0): the same loss, gradients and metrics to 1e-10, and those of Ethayarajh
    et al.'s loss with z₀ = max(0, mean over all 11 mismatched rows) written out (z₀ is float32)."""
    from posttrain.config import DPOLossConfig
    from posttrain.config.sections import TrainConfig
    from posttrain.train.grouped import GroupedStage
    from posttrain.train.loop import _train_step
    from posttrain.train.preference import PreferenceLoss, kto_extras

    c = DPOLossConfig(loss="kto", beta=0.5, kto_desirable_weight=1.5, kto_undesirable_weight=0.7)
    reference_model = _lm(tied=True)
    items = _kto_items(reference_model)
    assert len(items) == 11 and 0 < sum(bool(i.desirable) for i in items) < 11
    with torch.no_grad():
        ratios = [float(_seq_logp(reference_model, it.sequences[1])[0]) - it.reference_logps[1] for it in items]
    z0 = max(0.0, sum(ratios) / len(ratios))
    assert z0 == pytest.approx(1.8 / 11, abs=1e-5) and sum(ratios[:4]) / 4 == pytest.approx(2.2, abs=1e-5)
    loss, signed, logps = 0.0, 0.0, 0.0
    for it in items:
        logp = _seq_logp(reference_model, it.sequences[0])[0]
        r = logp - it.reference_logps[0]
        if it.desirable:
            loss = loss + c.kto_desirable_weight * (1 - torch.sigmoid(c.beta * (r - z0)))
        else:
            loss = loss + c.kto_undesirable_weight * (1 - torch.sigmoid(c.beta * (z0 - r)))
        signed += c.beta * float(r.detach()) * (1 if it.desirable else -1)
        logps += float(logp.detach())
    n = len(items)
    (loss / n).backward()
    expected = {"kl": z0, "rewards/signed": signed / n, "logps": logps / n}
    expected_grads = _grads(reference_model)

    runs = {}
    for split, groups in KTO_SPLITS.items():
        model = _lm(tied=True)
        module = PreferenceLoss(model, c, chunk_size=5)
        stage = GroupedStage(module, items, [], TrainConfig(batch_size=4), PAD, kto_extras)
        micro = [stage.collate([items[i] for i in g]) for g in groups]
        runs[split] = _train_step(module, stage, micro, _accelerator(tmp_path), _NoClip()) + (_grads(model),)
    whole = runs["whole"]
    for split, (step_loss, grad_norm, metrics, grads) in runs.items():
        assert step_loss == pytest.approx(whole[0], rel=1e-10), split
        assert grad_norm == pytest.approx(whole[1], rel=1e-10), split
        assert metrics == pytest.approx(whole[2], rel=1e-7), split  # kl: float32 z₀ × rows, summed
        _assert_grads_close(grads, whole[3], 1e-10)
    step_loss, grad_norm, metrics, grads = whole
    assert step_loss == pytest.approx(float(loss.detach()) / n, rel=1e-7)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    _assert_grads_close(grads, expected_grads, 1e-6)

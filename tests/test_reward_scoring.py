"""Review of the reward-model stage and scoring, against independent float64 computations.

The reference for a score is a plain forward of the same model over one prompt+response on
its own (no padding, no mask), the head applied to the final hidden state of its last token.
Tests whose docstring starts with BUG fail because of a defect named there.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.data.preferences import PreferenceRecord, encode_preference, encode_response
from posttrain.data.templates import CHATML
from posttrain.train.grouped import collate_items, items_from_examples
from posttrain.train.reward import RewardModelLoss, reward_extras

ROOT = Path(__file__).resolve().parents[1]
ME = "tests.test_reward_scoring"  # for --function specs (the repository root is on sys.path)
TURNS = [{"role": "user", "content": "Smallest letter: q m t"}]


# --------------------------------------------------------------------------- reward functions for `score`


def nan_on_b(prompt, response):
    return float("nan") if "b" in response else 1.0


def boom(prompt, response):
    raise ValueError("boom from a reward function")


def length(prompt, response):
    return float(len(response))


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny-2l")


def _reward_model(tokenizer, seed=0):
    """tiny-2l as a float64 reward model with a head far from zero (so scores differ visibly)."""
    from posttrain.models.reward_model import load_reward_model

    torch.manual_seed(seed)
    model = load_reward_model("tiny-2l", pad_token_id=tokenizer.pad_token_id).eval().double()
    torch.nn.init.normal_(model.score.weight)
    return model


def _plain_score(classifier, ids: list[int]) -> float:
    """The definition: one unpadded row, the head at its last token, float64."""
    with torch.no_grad():
        hidden = classifier.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return float(classifier.score(hidden.to(classifier.score.weight.dtype))[0])


def _items(tokenizer, rows):
    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(k),
                                source=f"t:{i}") for i, (p, r, k) in enumerate(rows)]
    return items_from_examples([encode_preference(rec, tokenizer, CHATML) for rec in records])


def _left_pad(input_ids, attention_mask, pad_id):
    width = input_ids.shape[1]
    ids, mask = torch.full_like(input_ids, pad_id), torch.zeros_like(attention_mask)
    for i, n in enumerate(attention_mask.sum(1).tolist()):
        ids[i, width - n:] = input_ids[i, :n]
        mask[i, width - n:] = 1
    return ids, mask


# --------------------------------------------------------------------------- score(): the last real token


def test_the_head_runs_in_float32_under_bf16_autocast(tokenizer):
    """Under bf16 autocast the body runs in bf16, but the one-output head is read in its float32
    weights: the reward is the float32 dot product of the (bf16) last hidden state with the head.
    Before, the head's matmul ran in bf16 too and the rewards kept ~3 significant digits."""
    from posttrain.data.batching import collate
    from posttrain.models.reward_model import score

    model = _reward_model(tokenizer).float()
    examples = [encode_response(TURNS, r, tokenizer, CHATML) for r in ("m", "a longer response " * 4, "x y z")]
    batch = collate(examples, tokenizer.pad_token_id)
    captured = []
    hook = model.model.norm.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = score(model, batch["input_ids"], batch["attention_mask"])
    hook.remove()
    hidden = captured[0].double()  # the final norm's output: (1, N) real tokens (padding-free) or (B, T)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    ends = torch.tensor([len(e.input_ids) for e in examples]).cumsum(0) - 1
    if hidden.shape[0] != int(ends[-1]) + 1:  # padded rows: the last real token of each row
        ends = torch.arange(len(examples)) * batch["input_ids"].shape[1] + batch["attention_mask"].sum(1) - 1
    expected = (hidden[ends] @ model.score.weight.double().T)[:, 0]
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_score_equals_a_plain_forward_of_each_row_any_padding_any_batch(tokenizer, padding_free):
    """Rows of 8..~130 tokens; one whose last real token is the pad id, which is also made the
    eos id (pad == eos): the score is read from the attention mask, not the token ids. Right and
    left padding, a batch of one, and the same row in two different batches all give the plain
    forward's score."""
    from posttrain.data.batching import collate
    from posttrain.models.attention import padding_free as set_padding_free
    from posttrain.models.reward_model import score

    model = _reward_model(tokenizer)
    pad = tokenizer.pad_token_id
    model.config.eos_token_id = pad  # eos == pad
    assert set_padding_free(model, padding_free) is padding_free
    examples = [encode_response(TURNS, r, tokenizer, CHATML) for r in ("m", "a much longer response " * 10, "x")]
    examples.append(encode_response(TURNS, "q", tokenizer, CHATML))
    examples[2].input_ids += [pad]  # a real token equal to the pad (and eos) id
    examples[2].labels += [pad]
    examples.insert(0, type(examples[0])(examples[0].input_ids[:8], examples[0].labels[:8], "short"))
    lengths = [len(e.input_ids) for e in examples]
    assert min(lengths) == 8 and max(lengths) > 100
    expected = [_plain_score(model, e.input_ids) for e in examples]

    batch = collate(examples, pad)
    left_ids, left_mask = _left_pad(batch["input_ids"], batch["attention_mask"], pad)
    with torch.no_grad():
        right = score(model, batch["input_ids"], batch["attention_mask"]).tolist()
        left = score(model, left_ids, left_mask).tolist()
        alone = [float(score(model, torch.tensor([e.input_ids]), torch.ones(1, len(e.input_ids), dtype=torch.long)))
                 for e in examples]
        other = collate([examples[2], examples[0]], pad)  # row 2 again, in another batch, with another partner
        again = score(model, other["input_ids"], other["attention_mask"]).tolist()
    assert right == pytest.approx(expected, abs=1e-6)
    assert left == pytest.approx(expected, abs=1e-6)
    assert alone == pytest.approx(expected, abs=1e-6)
    assert again == pytest.approx([expected[2], expected[0]], abs=1e-6)


def test_gpt2_left_padded_batch_scores_like_each_row_alone(tokenizer):
    """BUG: models/reward_model.py promises 'left and right padding score alike' for decoders and
    names GPT-2. In `score`'s padded path (reward_model.py:132-133) only the mask is passed, no
    position_ids; GPT-2 (absolute position embeddings) then numbers a left-padded row's tokens
    from the padding on, so its score moves (here by 0.08). Llama-like models hide it
    because RoPE is relative. Fix: pass position_ids = (mask.cumsum(1) - 1).clamp(min=0) there,
    as `attention.pack_rows` does."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from posttrain.models.reward_model import is_decoder_scorer, score

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=0)
    model = GPT2ForSequenceClassification(config).eval().double()
    assert is_decoder_scorer(model)
    examples = [encode_response(TURNS, r, tokenizer, CHATML) for r in ("m", "a longer response " * 5)]
    expected = [_plain_score(model, e.input_ids) for e in examples]
    from posttrain.data.batching import collate

    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        right = score(model, batch["input_ids"], batch["attention_mask"]).tolist()
        left = score(model, *_left_pad(batch["input_ids"], batch["attention_mask"], tokenizer.pad_token_id)).tolist()
    assert right == pytest.approx(expected, abs=1e-6)
    assert left == pytest.approx(expected, abs=1e-6)


def test_encoder_backbone_scores_a_right_padded_batch_like_each_row_alone(tokenizer):
    """A BERT-like encoder is scored by its own pooling: a padded batch (and a batch of one)
    equals each row alone."""
    from transformers import BertConfig, BertForSequenceClassification

    from posttrain.models.reward_model import is_decoder_scorer, score

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.pad_token_id)).eval().double()
    assert not is_decoder_scorer(model)
    items = _items(tokenizer, [("Smallest letter: q m t", ("m", "a much longer answer " * 6), (0, 1))])
    rows = [s.input_ids for s in items[0].sequences]
    with torch.no_grad():
        expected = [float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in rows]
        batch = collate_items(items, tokenizer.pad_token_id)
        batched = score(model, batch["input_ids"], batch["attention_mask"]).tolist()
        one = float(score(model, torch.tensor([rows[1]]), torch.ones(1, len(rows[1]), dtype=torch.long)))
    assert batched == pytest.approx(expected, abs=1e-9) and one == pytest.approx(expected[1], abs=1e-9)


# --------------------------------------------------------------------------- the loss and metrics


def _bt(chosen, rejected, margin, c):
    return -math.log(1 / (1 + math.exp(-(chosen - rejected - margin)))) + c * (chosen + rejected) ** 2


@pytest.mark.parametrize("use_margins", [True, False])
def test_bradley_terry_with_margin_and_centering_equals_its_definition(tokenizer, use_margins):
    """Pairs, one with the better response second (ranks (1, 0)); per-row margins; centering.
    L = Σ_pairs −log σ(r_w − r_l − m) + c (r_w + r_l)², rewards from plain float64 forwards."""
    model = _reward_model(tokenizer)
    items = _items(tokenizer, [("Smallest letter: q m t", ("m", "t"), (0, 1)),
                               ("Copy: a b", ("b a b a", "a b"), (1, 0)),
                               ("Reverse: x y z", ("z y x", "x y z"), (0, 1))])
    margins = [0.5, 1.5, 0.0]
    for item, m in zip(items, margins):
        item.margin = m
    batch = collate_items(items, tokenizer.pad_token_id) | reward_extras(items)
    with torch.no_grad():
        loss, metrics = RewardModelLoss(model, centering=0.05, use_margins=use_margins)(**batch)
    r = [[_plain_score(model, s.input_ids) for s in item.sequences] for item in items]
    expected, accuracy, margin = 0.0, 0.0, 0.0
    for (a, b), item, m in zip(r, items, margins):
        w, l = (a, b) if item.ranks[0] < item.ranks[1] else (b, a)
        expected += _bt(w, l, m if use_margins else 0.0, 0.05)
        accuracy += 1.0 if w > l else 0.5 if w == l else 0.0
        margin += w - l
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(accuracy)
    assert float(metrics["margin"]) == pytest.approx(margin, abs=1e-5)
    assert float(metrics["reward_mean"]) == pytest.approx(sum((a + b) / 2 for a, b in r), abs=1e-5)


def test_ranking_loss_weights_each_prompt_once_and_counts_ties_half(tokenizer):
    """A pair and a 4-way ranking in one batch (the ranking loss). The ranking has a tie in its
    ranks (no pair between them) and two identical responses ranked differently (equal rewards:
    accuracy counts that pair one half). Per prompt −1/|pairs| Σ log σ(r_i − r_j) + c (2·mean r)²."""
    model = _reward_model(tokenizer)
    items = _items(tokenizer, [("Smallest letter: q m t", ("m", "t"), (0, 1)),
                               ("Count letters: a b c", ("3", "4", "4", "2"), (0, 1, 2, 2))])
    batch = collate_items(items, tokenizer.pad_token_id) | reward_extras(items)
    with torch.no_grad():
        loss, metrics = RewardModelLoss(model, centering=0.02)(**batch)
    expected, accuracy, margin, mean = 0.0, 0.0, 0.0, 0.0
    for item in items:
        r = [_plain_score(model, s.input_ids) for s in item.sequences]
        pairs = item.ordered_pairs()
        expected += sum(-math.log(1 / (1 + math.exp(-(r[i] - r[j])))) for i, j in pairs) / len(pairs)
        expected += 0.02 * (2 * sum(r) / len(r)) ** 2
        accuracy += sum(1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0 for i, j in pairs) / len(pairs)
        margin += sum(r[i] - r[j] for i, j in pairs) / len(pairs)
        mean += sum(r) / len(r)
    assert len(items[1].ordered_pairs()) == 5  # (0,1) (0,2) (0,3) (1,2) (1,3); 2 and 3 tie
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(accuracy)
    assert float(metrics["margin"]) == pytest.approx(margin, abs=1e-5)
    assert float(metrics["reward_mean"]) == pytest.approx(mean, abs=1e-5)
    assert (accuracy * 5) % 1 == pytest.approx(0.5)  # the identical responses' pair did count one half


# --------------------------------------------------------------------------- run_rm end to end


def _write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _rm_files(directory: Path) -> tuple[str, str]:
    train, evaluation = [], []
    for i in range(16):
        letters = [LETTERS[(i * 7 + k * 5) % 26] for k in range(3)]
        train.append({"prompt": f"Smallest letter: {' '.join(letters)}", "chosen": min(letters),
                      "rejected": max(letters), "margin": (i % 3) * 0.5})
    evaluation = [
        {"prompt": "Smallest letter: q m t", "responses": ["m", "q", "t"], "ranks": [0, 1, 1]},
        {"prompt": "Smallest letter: d z k", "responses": ["d", "z"], "ranks": [0, 1]},
        {"prompt": "Smallest letter: w c p", "responses": ["c", "p", "w"], "ranks": [0, 1, 2]},
    ]
    return _write_jsonl(directory / "train.jsonl", train), _write_jsonl(directory / "eval.jsonl", evaluation)


def _rm_config(directory: Path, method: str):
    from posttrain.config import RMConfig

    train, evaluation = _rm_files(directory)
    return RMConfig.from_dict({
        "output_dir": str(directory / method), "model": {"path": "tiny-2l"}, "adapter": {"method": method},
        "data": {"train_files": [train], "eval_files": [evaluation], "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress_bar": False, "resume": "never"},
        "reward": {"centering": 0.01}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Full and LoRA reward models trained 3 steps on tiny-2l, with spies on (a) the head as
    built, before any step, and (b) the mode and grad state of every loss forward."""
    import posttrain.train.reward as reward

    out = tmp_path_factory.mktemp("rm-runs")
    runs = {}
    for method in ("full", "lora"):
        heads, calls = {}, []
        build, forward = reward.build_reward_model, RewardModelLoss.forward

        def spy_build(*args, _build=build, _heads=heads, **kwargs):
            model = _build(*args, **kwargs)
            _heads.update({k: v.detach().clone() for k, v in model.state_dict().items() if "score" in k})
            return model

        def spy_forward(self, *args, _forward=forward, _calls=calls, **kwargs):
            _calls.append((self.training, self.model.training, torch.is_grad_enabled()))
            return _forward(self, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(reward, "build_reward_model", spy_build)
            mp.setattr(RewardModelLoss, "forward", spy_forward)
            cfg = _rm_config(out, method)
            run_dir = reward.run_rm(cfg)
        runs[method] = {"run_dir": run_dir, "cfg": cfg, "heads": heads, "calls": calls,
                        "summary": json.loads((run_dir / "summary.json").read_text())}
    return runs


def _eval_examples(cfg, tmp_path):
    from posttrain.data.preferences import prepare_preference_data
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path)
    return prepare_preference_data(cfg.data, tokenizer, tmp_path, cfg.train.seed, lambda *_: None).eval


def _metrics_by_definition(rewards: list[list[float]], ranks: list[list[int]]) -> dict[str, float]:
    """Per prompt accuracy (ties ½), margin, mean and mean square, averaged over prompts; std from them."""
    acc = mar = mean = sq = 0.0
    for r, k in zip(rewards, ranks):
        pairs = [(i, j) for i in range(len(k)) for j in range(len(k)) if k[i] < k[j]]
        acc += sum(1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0 for i, j in pairs) / len(pairs)
        mar += sum(r[i] - r[j] for i, j in pairs) / len(pairs)
        mean += sum(r) / len(r)
        sq += sum(x * x for x in r) / len(r)
    n = len(rewards)
    return {"accuracy": acc / n, "margin": mar / n, "reward_mean": mean / n,
            "reward_std": math.sqrt(max(sq / n - (mean / n) ** 2, 0.0))}


def test_saved_full_reward_model_reloads_in_transformers_and_reproduces_the_held_out_metrics(trained, tmp_path):
    """`final` loads with plain AutoModelForSequenceClassification; its own forward on each held-out
    response alone (float64) gives the logged eval_after accuracy, margin, reward mean and std, and
    posttrain's RewardModelScorer gives the same scores."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards import RewardModelScorer

    run = trained["full"]
    final = run["run_dir"] / "final"
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval().double()
    examples = _eval_examples(run["cfg"], tmp_path)
    assert [len(e.sequences) for e in examples] == [3, 2, 3]
    with torch.no_grad():
        rewards = [[float(hf(input_ids=torch.tensor([s.input_ids])).logits[0, 0]) for s in e.sequences] for e in examples]
    expected = _metrics_by_definition(rewards, [e.ranks for e in examples])
    assert run["summary"]["eval_after"] == pytest.approx(expected, abs=1e-5)
    assert run["summary"]["eval_before"] != run["summary"]["eval_after"]

    rows = [
        ([{"role": "user", "content": "Smallest letter: q m t"}], "m"),
        ([{"role": "user", "content": "Smallest letter: d z k"}], "z"),
    ]
    scorer = RewardModelScorer(str(final))
    got = scorer([p for p, _ in rows], [r for _, r in rows])
    with torch.no_grad():
        plain = [float(hf(input_ids=torch.tensor([encode_response(p, r, scorer.tokenizer, scorer.template).input_ids]))
                       .logits[0, 0]) for p, r in rows]
    assert got == pytest.approx(plain, abs=1e-5)


def test_lora_reward_model_trains_and_saves_its_head(trained, tmp_path):
    """With adapter.method=lora the score head is trained (it moved from its initial value) and
    saved in the adapter; `load_reward_model` on the adapter directory reloads it (the same scores
    under any seed, not a fresh head), and the reloaded model reproduces the held-out metrics."""
    from safetensors.torch import load_file

    from posttrain.models.reward_model import load_reward_model

    run = trained["lora"]
    final = run["run_dir"] / "final"
    saved = {k: v for k, v in load_file(final / "adapter_model.safetensors").items() if "score" in k}
    assert len(saved) == 1
    (initial,) = [v for k, v in run["heads"].items() if "modules_to_save" in k]
    (head,) = saved.values()
    assert head.shape == initial.shape and not torch.allclose(head, initial)

    examples = _eval_examples(run["cfg"], tmp_path)
    scores = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = load_reward_model(final).eval().double()
        with torch.no_grad():
            scores.append([[float(model(input_ids=torch.tensor([s.input_ids])).logits[0, 0]) for s in e.sequences]
                           for e in examples])
    assert scores[0] == scores[1]
    expected = _metrics_by_definition(scores[0], [e.ranks for e in examples])
    assert run["summary"]["eval_after"] == pytest.approx(expected, abs=1e-5)


def test_lora_encoder_reward_model_reloads_with_the_same_scores(tokenizer, tmp_path):
    """BUG: a LoRA reward model on a BERT-like encoder whose checkpoint has no pooler (saved from
    BertForMaskedLM, as MLM-only checkpoints are; DistilBERT's pre_classifier alike) scores
    differently on every reload. The pooler is created fresh (random) at load, frozen
    (LoRA only adapts it), and not saved: `add_lora` (models/reward_model.py:78-89) leaves
    modules_to_save at peft's ['classifier', 'score'], and `_quiet_from_pretrained` hides the
    'newly initialized' report. The README promises the head saved with the adapter. Fix: load
    with output_loading_info and put every newly initialised module besides the head in
    modules_to_save (or refuse LoRA with a clear error naming those weights)."""
    from transformers import BertConfig, BertForMaskedLM

    from posttrain.config import LoraConfig
    from posttrain.models.reward_model import add_lora, load_reward_model

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    model = add_lora(load_reward_model(tmp_path / "mlm", pad_token_id=tokenizer.pad_token_id), LoraConfig()).eval()
    ids = torch.tensor([encode_response(TURNS, "m", tokenizer, CHATML).input_ids])
    with torch.no_grad():
        before = float(model(input_ids=ids).logits[0, 0])
    model.save_pretrained(tmp_path / "lora")
    reloaded = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            reloaded.append(float(load_reward_model(tmp_path / "lora").eval()(input_ids=ids).logits[0, 0]))
    assert reloaded == pytest.approx([before, before], abs=1e-6)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_held_out_metrics_are_computed_in_eval_mode_without_gradients(trained, method):
    """Every loss forward without gradients (the held-out passes: before training and at the end)
    runs in eval mode; every training forward runs in train mode with gradients (3 steps × 1
    micro-batch)."""
    calls = trained[method]["calls"]
    held_out = [c for c in calls if not c[2]]
    training = [c for c in calls if c[2]]
    assert len(held_out) >= 2 and all(not module and not model for module, model, _ in held_out)
    assert len(training) == 3 and all(module and model for module, model, _ in training)


def test_held_out_files_are_used_or_refused_with_synthetic_training_data(tokenizer, tmp_path):
    """BUG: with data.train_files=[synthetic] and data.eval_files given, the eval files are
    silently ignored: the held-out metrics (eval_before / eval_after, 'held-out pairwise
    accuracy') are computed on a synthetic split instead. data/preferences.py:468-472 takes the
    synthetic branch before looking at eval_files. Fix: read eval_files when given (or raise a
    ConfigError saying they are not used with synthetic data)."""
    from posttrain.config import RMConfig
    from posttrain.data.preferences import prepare_preference_data
    from posttrain.errors import UserError

    evaluation = _write_jsonl(tmp_path / "eval.jsonl",
                              [{"prompt": "Smallest letter: q m t", "chosen": "m", "rejected": "t"}])
    cfg = RMConfig.from_dict({"model": {"path": "tiny-2l"}, "data": {
        "train_files": ["synthetic"], "synthetic_size": 20, "eval_files": [evaluation]}})
    try:
        data = prepare_preference_data(cfg.data, tokenizer, tmp_path / "run", 0, lambda *_: None)
    except UserError as exc:
        assert "eval_files" in str(exc)
        return
    assert [e.source.split(":")[0] for e in data.eval] == [evaluation]


def test_rm_trains_in_a_fresh_process(tmp_path):
    """BUG (outside the reward code, but every `posttrain rm` hits it): in a fresh process the
    first optimizer step fails with 'a leaf Variable that requires grad is being used in an
    in-place operation'. train/optim.py:260-264 `_torch_step` calls
    `torch.optim.AdamW.step.__wrapped__`, assuming the class's step is torch's hook wrapper
    around the no_grad wrapper; that is so only after some plain torch AdamW was built (torch
    patches the class of the instance built). posttrain's subclass is patched instead, so
    `__wrapped__` is the bare step and it runs with gradients on. (`posttrain sft` fails alike,
    and so does tests/test_preference_stages.py -k runs_alike run alone; tests pass only once an
    earlier test in the process built a torch AdamW.) Fix: run the bare step under
    torch.no_grad(), or unwrap only the profile hook (check for `hooked`)."""
    code = ("from posttrain.config import RMConfig\nfrom posttrain.train.reward import run_rm\n"
            f"run_rm(RMConfig.load(None, ['output_dir={tmp_path}', 'model.path=tiny-2l', 'data.synthetic_size=16', "
            "'data.max_length=64', 'train.max_steps=1', 'train.batch_size=4', 'train.progress_bar=false']))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-1500:]


# --------------------------------------------------------------------------- posttrain score


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tokenizer):
    """An (untrained) tiny-2l reward model directory whose path contains '=' (as sweep run names do)."""
    from posttrain.models.reward_model import load_reward_model

    path = tmp_path_factory.mktemp("rm-dir") / "lr=1e-3"
    torch.manual_seed(0)
    model = load_reward_model("tiny-2l", pad_token_id=tokenizer.pad_token_id)
    torch.nn.init.normal_(model.score.weight)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _score(capsys, *args) -> tuple[int, str]:
    from posttrain.cli import main

    capsys.readouterr()
    rc = main(["score", *map(str, args)])
    return rc, capsys.readouterr().err


def test_scorer_gives_a_row_the_same_score_in_any_batch(rm_dir):
    """RewardModelScorer on rows of very different lengths: batch size 1, 2 or all, in either
    order, gives each row the same score, equal to transformers' own forward of the row alone."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards import RewardModelScorer

    prompts = [TURNS, [{"role": "user", "content": "Copy: a b " * 20}], [{"role": "user", "content": "x"}]]
    responses = ["m", "a b " * 20, "zz"]
    results = [RewardModelScorer(str(rm_dir), batch_size=size)(prompts, responses) for size in (1, 2, 3)]
    scorer = RewardModelScorer(str(rm_dir), batch_size=2)
    results.append(scorer(prompts[::-1], responses[::-1])[::-1])
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval().double()
    with torch.no_grad():
        plain = [float(hf(input_ids=torch.tensor([encode_response(p, r, scorer.tokenizer, scorer.template).input_ids]))
                       .logits[0, 0]) for p, r in zip(prompts, responses)]
    for got in results:
        assert got == pytest.approx(plain, abs=1e-5)


def test_score_keeps_extra_columns_and_order_and_may_write_over_its_input(rm_dir, tmp_path, capsys):
    """--output equal to --input: every row read before the file is opened for writing; extra
    columns (nested too) and row order kept; one column per component plus the weighted total."""
    rows = [{"prompt": "Smallest letter: q m t", "response": "m", "id": 1, "meta": {"k": [1, 2]}},
            {"prompt": [{"role": "user", "content": "Copy: a b"}], "completion": "a b", "id": 2}]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    rc, err = _score(capsys, "--model", f"rm={rm_dir}", "--function", f"len={ME}:length", "--weight", "len=0.25",
                     "--weight", "rm=2", "--input", path, "--output", path)
    assert rc == 0, err
    scored = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [r["id"] for r in scored] == [1, 2] and scored[0]["meta"] == {"k": [1, 2]}
    assert [r["reward_len"] for r in scored] == [1.0, 3.0]
    for r in scored:
        assert r["reward"] == pytest.approx(2 * r["reward_rm"] + 0.25 * r["reward_len"])


def test_score_function_that_raises_propagates_and_writes_nothing(tmp_path, capsys):
    """A reward function's exception stops scoring (not swallowed into a default score) as a
    one-line error naming the reward, the row and the exception's type and message, and no
    partial output file is left."""
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"}])
    out = tmp_path / "out.jsonl"
    rc, err = _score(capsys, "--function", f"b={ME}:boom", "--input", path, "--output", out)
    assert rc == 2 and f"{path}:1: reward 'b' raised ValueError: boom from a reward function" in err, err
    assert not out.exists()


def test_score_refuses_or_reports_overwriting_an_existing_column(tmp_path, capsys):
    """BUG: an input row that already has the output column (here 'reward': 5, say a human label)
    has it silently replaced: exit 0, no message, the value gone. README and --help ('name of the
    new column') say nothing about overwriting. rewards.py:262 `row | extra | {column: total}`.
    Fix: refuse (ConfigError naming the column and the first file:line that has it) unless an
    --overwrite flag is given, or at least warn; the same for the reward_<name> component columns."""
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a", "reward": 5}])
    out = tmp_path / "out.jsonl"
    rc, err = _score(capsys, "--function", f"len={ME}:length", "--input", path, "--output", out)
    assert rc != 0 or "overwrit" in err.lower(), f"exit {rc}, {out.read_text()!r}"
    if rc != 0:
        assert "reward" in err


def test_score_reports_a_nan_reward(tmp_path, capsys):
    """BUG: a component returning NaN for one row is neither reported nor refused: exit 0, the
    row's total is NaN and the line is written with a bare `NaN`, which is not JSON (RFC 8259;
    strict readers reject the file). With --calibrate one NaN makes the mean NaN and so every
    row's total NaN, rows whose own scores are finite included. rewards.py:151-168
    (CombinedReward.calibrate / score take the values as they come). Fix: check each component's
    values are finite and raise a DataError naming the component and the first bad row."""
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": "bb"}])
    out = tmp_path / "out.jsonl"
    rc, err = _score(capsys, "--function", f"len={ME}:length", "--function", f"n={ME}:nan_on_b",
                     "--input", path, "--output", out)
    assert rc != 0 and "nan" in err.lower(), f"exit {rc}, {out.read_text()!r}"


def test_combined_reward_checks_each_components_length():
    """BUG: a batch reward that returns the wrong number of values is not caught. Too many: the
    extras are silently dropped from the totals (raw keeps 4 values for 3 responses) and
    calibrate takes its mean/std over them; too few: a bare IndexError from inside the loop.
    rewards.py:152 and :160 (`_call` results are used unchecked). Fix: in `_call`, raise a
    ValueError/DataError naming the component when len(values) != len(responses)."""
    from posttrain.errors import UserError
    from posttrain.rewards import CombinedReward, RewardComponent

    prompts, responses = [TURNS] * 3, ["a", "bb", "ccc"]
    for wrong in ([1.0, 2.0], [1.0, 2.0, 3.0, 4.0]):
        combined = CombinedReward([RewardComponent("lengthy", lambda p, r, w=wrong: list(w))])
        with pytest.raises((ValueError, UserError), match="lengthy"):
            combined.score(prompts, responses)
        with pytest.raises((ValueError, UserError), match="lengthy"):
            combined.calibrate(prompts, responses)


def test_score_takes_a_model_directory_whose_path_contains_an_equals_sign(rm_dir):
    """BUG: `--model DIR` where DIR contains '=' (run directories named like lr=1e-3) is split at
    the first '=' as NAME=DIR, so posttrain tries to load '1e-3' and fails. rewards.py:204
    `item.partition("=")`. Fix: take NAME=DIR only when the part before '=' is a plain name (no
    path separator) or when the whole argument is not an existing path."""
    from posttrain.rewards import build_combined

    assert "=" in str(rm_dir) and rm_dir.is_dir()
    combined = build_combined([str(rm_dir)], [], [], [])
    assert [c.name for c in combined.components] == ["reward_model"]

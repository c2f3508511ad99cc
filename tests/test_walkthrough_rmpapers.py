"""A walk through the reward models, read against their papers.

Walked: README's *Reward models and preference optimisation* (the reward-model part), the pure losses
(`losses/preference.py`: Bradley-Terry as InstructGPT's −log σ(r_w − r_l), Llama 2's margin
−log σ(r_w − r_l − m), Eisenstein et al.'s centering c·(r_w + r_l)², and the K-way ranking loss over its
K(K−1)/2 ordered pairs, each prompt weighted once, ties making no pair), the stage (`train/reward.py`: the
loss per batch layout, accuracy with ties counting half, margin, reward mean and std per prompt then
averaged), which token scores (`models/reward_model.py`, `models/readout.py`: a decoder's last real token
from the attention mask, either padding side; an encoder's own pooling at [CLS], as
BertForSequenceClassification reads it), the multi-objective combination (`rewards.py`: weighted sum of
shifted and scaled components, floors on the raw reward, `pareto_front` by weak dominance) and
`posttrain score` (its `reward` column, a column per component when several, rows cut at a reward model's
positions and counted).

Right, and tested elsewhere already: every formula against a float64 writing-out (margins, centering,
rankings K = 2..5 with ties and absent slots), the metrics on hand-made scores with ties, the std over
every held-out reward, summary.json's eval_after against a plain transformers reload of final/, left and
right padding, the encoder's [CLS] pooling, a row's score alike in any batch, and the decoder head read in
float32 under bf16 autocast. Right and untested until here: a reward model beside a function in
`posttrain score`, where the model's column is a plain float64 forward of the row and the total the
weighted sum.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 33:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain import cli

ROOT = Path(__file__).resolve().parents[1]
ME = "tests.test_walkthrough_rmpapers"  # for --function specs (the repository root is on sys.path)
TABLE = 2048  # the position table of the decoder reward model below: twice the tiny preset's


def length_reward(prompt, response):
    return float(len(response))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # `tests.test_walkthrough_rmpapers:length_reward` is imported from here


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny-2l")


@pytest.fixture(scope="module")
def long_rm(tmp_path_factory, tokenizer) -> Path:
    """tiny-2l's shape as a Llama reward model with a 2048-position table and a trained-looking head
    (far from zero, so scores differ visibly), saved with its tokenizer as `posttrain rm` saves one."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from posttrain.models.presets import preset_path

    config = AutoConfig.from_pretrained(preset_path("tiny-2l"), num_labels=1, pad_token_id=tokenizer.pad_token_id,
                                        max_position_embeddings=TABLE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
        torch.nn.init.normal_(model.score.weight)
    out = tmp_path_factory.mktemp("rmpapers") / "rm2048"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _plain_scores(directory: Path, prompts: list[list[dict]], responses: list[str]) -> tuple[list[float], list[int]]:
    """The definition: plain transformers in float64, each row alone (no padding), the head at its last
    token; with each row's length in tokens."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.data.preferences import encode_response
    from posttrain.data.templates import resolve_template
    from posttrain.models.loading import load_tokenizer

    tok = load_tokenizer(str(directory))
    template = resolve_template(tok, "auto")
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float64).eval()
    scores, lengths = [], []
    for prompt, response in zip(prompts, responses):
        ids = encode_response(prompt, response, tok, template).input_ids
        with torch.no_grad():
            scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
        lengths.append(len(ids))
    return scores, lengths


def _cli(capsys, *argv) -> tuple[int | None, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- posttrain score: how much of a row is read


def test_score_reads_a_decoder_reward_model_up_to_its_position_table_not_a_fixed_1024(long_rm, capsys, tmp_path):
    """README: `posttrain score` "cuts longer rows at any reward model's table". A decoder reward model with
    a 2048-position table, scoring a row of ~1,400 tokens, should read all of it: the score is then the
    plain float64 forward of the whole row, and nothing is cut. RewardModelScorer's max_length defaults to
    1024 (no option of `score` or of RL's reward.models changes it), so the row loses its first ~400
    tokens, is scored on the rest and the run reports "cut 1 of 1 rows longer than 1024 tokens"."""
    body = " ".join(["red", "blue", "green", "teal"] * 175)
    prompts, responses = [[{"role": "user", "content": f"Copy: {body}"}]], ["red"]
    (expected,), (n,) = _plain_scores(long_rm, prompts, responses)
    assert 1024 < n <= TABLE, n
    rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": f"Copy: {body}", "response": "red"}])
    out = tmp_path / "scored.jsonl"
    rc, said = _cli(capsys, "score", "--model", long_rm, "--input", rows, "--output", out)
    assert rc == 0, said
    (got,) = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    cut = [line for line in said.splitlines() if "cut " in line]
    assert got == pytest.approx(expected, abs=1e-4) and not cut, (
        f"a {n}-token row, {TABLE} positions: reward {got} against the whole row's {expected}; said: {cut}")


def test_a_reward_model_beside_a_function_in_score_is_its_plain_forward_and_the_total_the_weighted_sum(
        long_rm, capsys, tmp_path):
    """`posttrain score --model rm=DIR --function len=... --weight rm=0.5 --weight len=-0.25`: the `reward_rm`
    column is the model's plain float64 forward of each row alone (rows of unequal lengths share a padded
    batch), `reward_len` the function's value, and `reward` 0.5·rm − 0.25·len; every input column kept."""
    rows = [{"prompt": "Smallest letter: q m t", "response": "m", "id": 1},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Copy: a b c"}],
             "response": "a b c and some more words", "id": 2},
            {"prompt": "Reverse: x y", "response": "y x", "id": 3}]
    prompts = [[{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"] for r in rows]
    expected_rm, _ = _plain_scores(long_rm, prompts, [r["response"] for r in rows])
    out = tmp_path / "scored.jsonl"
    rc, said = _cli(capsys, "score", "--model", f"rm={long_rm}", "--function", f"len={ME}:length_reward",
                    "--weight", "rm=0.5", "--weight", "len=-0.25", "--input", _jsonl(tmp_path / "rows.jsonl", rows),
                    "--output", out, "--batch-size", "3")
    assert rc == 0, said
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["id"] for s in scored] == [1, 2, 3]
    assert [s["reward_rm"] for s in scored] == pytest.approx(expected_rm, abs=1e-5)
    assert [s["reward_len"] for s in scored] == [float(len(r["response"])) for r in rows]
    assert [s["reward"] for s in scored] == pytest.approx(
        [0.5 * rm - 0.25 * len(r["response"]) for rm, r in zip(expected_rm, rows)], abs=1e-5)


# --------------------------------------------------------------------------- an encoder's head under bf16 autocast


def test_an_encoder_reward_models_head_reads_float32_under_bf16_autocast_as_a_decoders_does(tokenizer):
    """`score` runs a decoder's one-output head in its float32 weights under bf16 autocast
    (`head_in_own_precision`: in bf16 "rewards ... kept ~3 significant digits (ties between close
    responses, coarse margins)"), but an encoder's (BertForSequenceClassification: pooler at [CLS], then
    the classifier) runs under autocast as it is, so `train.mixed_precision: bf16` trains and measures a
    BERT-like reward model on bf16 rewards: here three different responses score 2.75, 2.734375,
    2.734375, the last two a tie the accuracy counts as half right. Right: float32 rewards, the float32
    classifier applied to the pooled [CLS] state."""
    from transformers import BertConfig, BertForSequenceClassification

    from posttrain.data.batching import collate
    from posttrain.data.preferences import encode_response
    from posttrain.data.templates import CHATML
    from posttrain.models.reward_model import score

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
            num_labels=1)).eval()
        torch.nn.init.normal_(model.classifier.weight, std=3.0)
    turns = [{"role": "user", "content": "Smallest letter: q m t"}]
    examples = [encode_response(turns, r, tokenizer, CHATML, special_tokens=True)
                for r in ("m", "a longer response " * 3, "x y z")]
    batch = collate(examples, tokenizer.pad_token_id)
    pooled = []
    hook = model.bert.pooler.register_forward_hook(lambda module, args, out: pooled.append(out.detach()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = score(model, batch["input_ids"], batch["attention_mask"])
    hook.remove()
    expected = (pooled[0].double() @ model.classifier.weight.double().T + model.classifier.bias.double())[:, 0]
    assert rewards.dtype == torch.float32 and rewards.tolist() == pytest.approx(expected.tolist(), abs=1e-5), (
        f"rewards {rewards.dtype} {rewards.tolist()}; the float32 head on the pooled state: {expected.tolist()}")

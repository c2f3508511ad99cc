"""Session 29, RL and rewards: the RL reference with virtual tokens is the starting policy, flat
groups, no KL figure without a reference, the critic in params.json, and the reward checks made
once the prompts are read (rows without an answer, TRL-style batch functions)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from posttrain import cli
from posttrain.config import GRPOConfig, PPOConfig
from posttrain.data.prompts import PromptRecord
from posttrain.errors import ConfigError, DataError

QUICK = ["train.max_steps=1", "train.batch_size=8", "eval.prompts=0", "train.progress_bar=false",
         "data.synthetic_size=64", "rollout.max_new_tokens=4"]


def _model(*methods: str):
    from posttrain.train.sft import build_model

    cfg = GRPOConfig.load(None, [f"adapter.method=[{','.join(methods)}]", "adapter.virtual_tokens.num_virtual_tokens=3",
                                 "adapter.bottleneck.size=4", "adapter.bottleneck.init_std=0.5", "model.path=tiny-2l"])
    torch.manual_seed(0)
    return build_model(cfg, lambda *_: None)[1].eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 33, 80, 200, 11, 9]])


@pytest.mark.parametrize("methods", [("prompt",), ("prefix",), ("prompt", "lora", "bottleneck")])
def test_reference_with_virtual_tokens_is_the_starting_policy_after_the_adapters_moved(methods):
    """StartingVirtualTokens: inside reference_weights the policy is its starting self to the bit
    (virtual tokens at their first draw, the other adapters at their identity start), however far
    the adapters have moved since; after the block the moved weights are back, unchanged."""
    from posttrain.train.preference import StartingVirtualTokens, reference_weights

    model = _model(*methods)
    start = _logits(model, IDS)
    kept = StartingVirtualTokens(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(_logits(model, IDS), start)
    with reference_weights(model, kept) as reference:
        assert torch.equal(_logits(reference, IDS), start)
    assert all(torch.equal(v, moved[k]) for k, v in model.state_dict().items())
    with reference_weights(model) as base:  # adapters and virtual tokens off: the base, not the start
        assert not torch.equal(_logits(base, IDS), start)


def test_bottleneck_adapters_start_as_the_identity_whatever_init_std():
    """W_up and b_up start at zero, so a bottleneck adds an exact 0 however large W_down's draw:
    switching the adapters off is the starting policy (no snapshot needed)."""
    model = _model("bottleneck")
    start = _logits(model, IDS)
    with model.adapters_disabled():
        assert torch.equal(_logits(model, IDS), start)


def test_grpo_with_prompt_tuning_moves_away_from_the_kept_start(tmp_path, monkeypatch):
    """Two steps: kl is 0 at the first (π = π_ref) and not at the second; the held-out KL before
    training is 0 and after it is not."""
    (tmp_path / "s29_length.py").write_text("def length(prompt, response):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = cli.main(["grpo", "examples/grpo.yaml", f"output_dir={tmp_path / 'run'}", "model.path=tiny-2l", *QUICK,
                   "train.max_steps=2", "train.lr=0.05", "eval.prompts=2", "eval.samples=2", "adapter.method=prompt",
                   "grpo.beta=0.04", "reward.functions=[length=s29_length:length]"])
    tmp_path = tmp_path / "run"
    assert rc == 0
    first, second = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert first["grad_norm"] > 0  # the samples' rewards differ: the virtual tokens move
    assert first["kl"] == 0.0 and second["kl"] != 0.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["held_out_before"]["kl_to_reference"] == 0.0
    assert summary["held_out_after"]["kl_to_reference"] != 0.0


class _Engine:
    is_policy = True

    def __init__(self, tokenizer, texts):
        self.outs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]

    def generate(self, prompts, settings, **kwargs):
        return self.outs[: len(prompts)]


def test_flat_groups_counts_all_right_and_all_wrong_groups_alike():
    """rollout/flat_groups: prompts whose samples all got the same reward, right or wrong alike."""
    from posttrain.models.loading import load_tokenizer
    from posttrain.train.rollouts import build_reward, sample_and_score

    tokenizer = load_tokenizer("tiny-2l")
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "reward.functions=[em=posttrain.rewards:exact_match]"])
    records = [PromptRecord([{"role": "user", "content": f"q{i}"}], "m", source=f"r:{i}") for i in range(3)]
    engine = _Engine(tokenizer, ["m", "m", "b", "t", "m", "b"])  # all right, all wrong, mixed
    rollout = sample_and_score(engine, tokenizer, [[1, 5]] * 3, records, [0, 1, 2], cfg, build_reward(cfg), seed=0)
    assert rollout.rewards.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert rollout.stats.flat_groups == pytest.approx(2 / 3)
    assert not hasattr(rollout.stats, "solved_groups")


def test_ppo_with_a_value_head_counts_it_in_params_json_and_logs_kl_with_a_reference(tmp_path, capsys):
    """The default value head: params.json and the start-of-run report count its hidden + 1
    parameters as the critic; with β > 0 rollout/kl is measured and logged."""
    from posttrain.models.loading import load_model

    rc = cli.main(["ppo", "examples/ppo.yaml", f"output_dir={tmp_path}", "model.path=tiny-2l", *QUICK, "ppo.epochs=1"])
    out = capsys.readouterr()
    assert rc == 0
    params = json.loads((tmp_path / "params.json").read_text())
    policy = load_model(str(tmp_path / "final"))
    head = policy.config.hidden_size + 1
    assert params["by_method"]["critic"] == {"trainable": head, "total": head}
    assert params["trainable"] == sum(p.numel() for p in policy.parameters()) + head
    assert f"critic (a value head): trainable {head:,} params" in out.err + out.out
    assert "rollout/kl" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture
def module(tmp_path, monkeypatch):
    """A module of reward functions on sys.path."""
    (tmp_path / "s29_rewards.py").write_text(
        "def trl_pair(prompts, completions, **kwargs):\n    return [0.0 for _ in completions]\n"
        "def one(response):\n    return 0.0\n"
        "def with_row(prompt, response, row):\n    return float(row['gold'] in response)\n"
        "with_row.row_keys = ('gold',)\n"
        "def plain(prompt, response):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("s29_rewards", None)
    return "s29_rewards"


@pytest.mark.parametrize("name", ["trl_pair", "one"])
def test_reward_functions_posttrain_cannot_call_per_sample_are_refused_before_the_model(module, name):
    from posttrain.train.rollouts import check_reward_functions

    cfg = GRPOConfig.load(None, [f"reward.functions=[r={module}:{name}]"])
    with pytest.raises(ConfigError, match=r"fn\(prompt_turns, response\)") as exc:
        check_reward_functions(cfg)
    assert ("TRL-style" in str(exc.value)) == (name == "trl_pair")


def test_a_row_key_a_reward_function_declares_is_checked_in_every_file_by_line(module, tmp_path):
    """A function's `row_keys` are checked like exact_match's answer, in the held-out file too,
    the first row lacking one named by file:line, before the model loads."""
    from posttrain.train.rollouts import check_prompt_rows, check_reward_functions

    cfg = GRPOConfig.load(None, [f"reward.functions=[g={module}:with_row,p={module}:plain]"])
    rewards = check_reward_functions(cfg)
    ok = PromptRecord([{"role": "user", "content": "q"}], None, {"gold": "m"}, "train.jsonl:1")
    bad = PromptRecord([{"role": "user", "content": "q"}], None, {"solution": "m"}, "eval.jsonl:3")
    check_prompt_rows(rewards, [ok])
    with pytest.raises(DataError, match=r"^eval\.jsonl:3: the reward 'g' needs a 'gold'.*solution"):
        check_prompt_rows(rewards, [ok, bad])


def test_conversation_rows_without_an_answer_stop_ppo_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Messages rows that end with the user's turn carry no reference answer: with exact_match the
    run stops naming the row by file:line, and no model is built."""
    from posttrain.train import sft

    rows = [{"messages": [{"role": "user", "content": f"Smallest letter: {s}"}]} for s in ("q m", "z d", "w p", "c b")]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(sft, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    rc = cli.main(["ppo", "examples/ppo.yaml", f"output_dir={tmp_path / 'run'}", f"data.train_files=[{path}]",
                   "data.eval_fraction=0", *QUICK[:-2]])
    out = capsys.readouterr()
    assert rc == 2 and f"{path}:1: the reward 'exact_match' needs an 'answer'" in out.err + out.out


def test_synthetic_prompts_carry_the_answer_exact_match_reads():
    """The default data: nothing to refuse."""
    from posttrain.data.prompts import prepare_prompts
    from posttrain.rewards import exact_match, missing_row_key

    train, held_out, _ = prepare_prompts(PPOConfig.load(None, []).data, None, 0, lambda *_: None)
    assert missing_row_key({"em": exact_match}, train + held_out) is None


def test_a_format_regex_alone_is_a_reward_and_no_reward_at_all_is_refused_up_front():
    """reward.functions=[] with reward.format_regex was refused at build time, after the model loaded,
    as 'reward components need distinct names, got []'; with nothing at all the run is refused
    before the model loads, naming the settings."""
    from posttrain.train.rollouts import build_reward, check_reward_functions

    only_format = GRPOConfig.load(None, ["reward.functions=[]", "reward.format_regex='[a-z]'"])
    check_reward_functions(only_format)
    assert build_reward(only_format)([[{"role": "user", "content": "q"}]] * 2, ["m", "12"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="no reward: set reward.functions, reward.models or reward.format_regex"):
        check_reward_functions(GRPOConfig.load(None, ["reward.functions=[]"]))


def test_a_resumed_grpo_run_with_prompt_tuning_keeps_the_same_reference(tmp_path, monkeypatch):
    """The starting virtual tokens are kept when the run starts, before a checkpoint's weights load:
    a resumed run's reference is the first run's starting policy, so its steps equal an
    uninterrupted run's bitwise (kl included)."""
    (tmp_path / "s29_length2.py").write_text("def length(prompt, response):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(name, steps):
        rc = cli.main(["grpo", "examples/grpo.yaml", f"output_dir={tmp_path / name}", "model.path=tiny-2l", *QUICK,
                       f"train.max_steps={steps}", "train.save_every=2", "train.schedule=constant", "train.lr=0.05",
                       "adapter.method=prompt", "grpo.beta=0.04", "reward.functions=[length=s29_length2:length]"])
        assert rc == 0
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    whole = run("whole", 4)
    run("parts", 2)
    parts = run("parts", 4)
    keys = ("loss", "kl", "grad_norm", "rollout/reward_mean")
    assert [[r[k] for k in keys] for r in parts] == [[r[k] for k in keys] for r in whole]
    assert whole[3]["kl"] > 0

"""Edges of model / tokenizer loading: pickle and remote-code safety, dtypes, paths, presets.

Expectations come from plain torch / safetensors / transformers calls and the README's
contract ("Weights load from safetensors only — a directory with only pickle `.bin` weights
is refused — and `model.trust_remote_code` must be set explicitly to run code shipped with a
model"; loading.py: "posttrain never unpickles `.bin` files"; errors.py: problems with the
user's files are one-line `UserError`s).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from posttrain.errors import ConfigError, UserError
from posttrain.models import presets
from posttrain.models.loading import load_model, load_tokenizer, resolve_model_path
from posttrain.models.reward_model import load_reward_model

PRESET = "tiny-2l"


@pytest.fixture(scope="module", autouse=True)
def preset_cache(tmp_path_factory):
    """A private preset cache: these tests build what they use and touch no home directory."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("preset-cache-loading-edges")
        mp.setenv("POSTTRAIN_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def base_dir(preset_cache) -> Path:
    return presets.preset_path(PRESET)


def _copy_model_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


class _Marker:
    """Unpickling this object opens (creates) the marker file: a stand-in for arbitrary code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_state(tensors: dict, marker: Path) -> dict:
    evil = dict(tensors)
    evil["zzz_payload"] = _Marker(marker)
    return evil


def _one_line(exc: BaseException) -> bool:
    return "\n" not in str(exc) and str(exc).strip() != ""


# =========================================================================== pickle: never unpickled


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_weights_are_refused_before_unpickling(base_dir, tmp_path, name):
    marker = tmp_path / "MARKER"
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(base_dir / "config.json", model_dir)
    torch.save(_malicious_state(load_file(str(base_dir / "model.safetensors")), marker), model_dir / name)
    for loader in (load_model, load_reward_model):
        with pytest.raises(UserError, match="safetensors") as info:
            loader(model_dir)
        assert _one_line(info.value)
    assert not marker.exists()


def test_malicious_bin_beside_safetensors_is_ignored(base_dir, tmp_path):
    marker = tmp_path / "MARKER"
    model_dir = _copy_model_dir(base_dir, tmp_path / "m")
    expected = load_file(str(base_dir / "model.safetensors"))
    torch.save(_malicious_state(expected, marker), model_dir / "pytorch_model.bin")
    model = load_model(model_dir)
    state = model.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    rm = load_reward_model(model_dir)
    assert torch.equal(rm.model.embed_tokens.weight, expected["model.embed_tokens.weight"])
    assert not marker.exists()


def _index_to_bin(base_dir: Path, model_dir: Path, tensors: dict) -> None:
    """A shard index (the file `_check_weights` accepts as "safetensors") that names a pickle shard."""
    _copy_model_dir(base_dir, model_dir)
    names = list(load_file(str(base_dir / "model.safetensors")))
    (model_dir / "model.safetensors").unlink()
    torch.save(tensors, model_dir / "pytorch_model-00001-of-00001.bin")
    index = {"metadata": {}, "weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in names}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def test_safetensors_index_naming_a_pickle_shard_is_refused(base_dir, tmp_path):
    _index_to_bin(base_dir, tmp_path / "m", load_file(str(base_dir / "model.safetensors")))
    with pytest.raises(UserError, match="safetensors"):
        load_model(tmp_path / "m")  # observed: loads, the weights coming out of torch.load


def _lora_adapter(base_dir: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(config))


def _adapter_as_bin(adapter: Path, marker: Path | None) -> None:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors if marker is None else _malicious_state(tensors, marker), adapter / "adapter_model.bin")


def test_pickle_adapter_is_refused(base_dir, tmp_path):
    from posttrain.models.adapters import load_adapted

    adapter = tmp_path / "adapter"
    _lora_adapter(base_dir, adapter)
    _adapter_as_bin(adapter, marker=None)
    with pytest.raises(UserError, match="safetensors"):
        load_adapted(str(adapter))  # observed: loads the LoRA weights from the pickle


@pytest.mark.parametrize("where", ["shard index", "adapter", "reward adapter"])
def test_malicious_pickle_never_runs(base_dir, tmp_path, where):
    """Whatever path a pickle comes in by, its code never runs (torch.load(weights_only=True) at
    worst; the error type is covered by the xfail tests above)."""
    from posttrain.models.adapters import load_adapted

    marker = tmp_path / "MARKER"
    if where == "shard index":
        tensors = _malicious_state(load_file(str(base_dir / "model.safetensors")), marker)
        _index_to_bin(base_dir, tmp_path / "m", tensors)
        with pytest.raises(Exception):
            load_model(tmp_path / "m")
    elif where == "adapter":
        _lora_adapter(base_dir, tmp_path / "adapter")
        _adapter_as_bin(tmp_path / "adapter", marker)
        with pytest.raises(Exception):
            load_adapted(str(tmp_path / "adapter"))
    else:
        from posttrain.config.sections import LoraConfig
        from posttrain.models.reward_model import add_lora

        add_lora(load_reward_model(base_dir), LoraConfig(r=2)).save_pretrained(tmp_path / "rm")
        _adapter_as_bin(tmp_path / "rm", marker)
        with pytest.raises(Exception):
            load_reward_model(tmp_path / "rm")
    assert not marker.exists()


def test_checkpoints_are_safetensors_and_json_and_restore_exactly(tmp_path):
    from posttrain.train import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    want_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    want_moments = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    directory = checkpoint.save(tmp_path / "ckpt", 2, model=model, optimizer=opt, loop_state={"step": 2}, rank=0,
                                world_size=1, barrier=lambda: None, keep_last=1)
    assert {p.suffix for p in directory.iterdir()} <= {".safetensors", ".json"}
    marker = tmp_path / "MARKER"
    torch.save({"x": _Marker(marker)}, directory / "optimizer.pt")  # a planted pickle beside the checkpoint

    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert checkpoint.load(directory, model=fresh, optimizer=fresh_opt, rank=0) == {"step": 2}
    for name, param in fresh.named_parameters():
        assert torch.equal(param, want_params[name])
    for index, moments in fresh_opt.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, want_moments[index][key]), (index, key)
    assert not marker.exists()


# =========================================================================== trust_remote_code

_SNIPPET = """
import sys
from posttrain.errors import UserError
from posttrain.models.loading import load_model, load_tokenizer
from posttrain.models.reward_model import load_reward_model
loader = {"model": load_model, "tokenizer": load_tokenizer, "reward": load_reward_model}[sys.argv[1]]
try:
    loader(sys.argv[2])
except UserError as exc:
    print("USERERROR", exc)
except Exception as exc:
    print("OTHER", type(exc).__name__)
"""


def _remote_code_dir(base_dir: Path, target: Path, marker: Path, kind: str) -> Path:
    """A model dir whose config (or tokenizer config) maps the Auto class to local code that, on
    import, creates `marker`."""
    _copy_model_dir(base_dir, target)
    (target / "evil_code.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'posttrain_evil_arch'\n"
        "class EvilModel:\n    pass\n"
        "class EvilTokenizer:\n    pass\n"
    )
    if kind in ("model", "reward"):
        config = {"model_type": "posttrain_evil_arch",
                  "auto_map": {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel",
                               "AutoModelForSequenceClassification": "evil_code.EvilModel"}}
        (target / "config.json").write_text(json.dumps(config))
    else:
        config = json.loads((target / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}
        config["tokenizer_class"] = "EvilTokenizer"
        (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def _run_loader(kind: str, directory: Path, tmp_path: Path, stdin: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "hf" / "modules"),
               HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", _SNIPPET, kind, str(directory)], input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("kind", ["model", "tokenizer", "reward"])
def test_remote_code_does_not_run_without_the_flag(base_dir, tmp_path, kind, monkeypatch):
    marker = tmp_path / "MARKER"
    directory = _remote_code_dir(base_dir, tmp_path / "m", marker, kind)

    def no_terminal(*_):
        raise EOFError

    monkeypatch.setattr("builtins.input", no_terminal)  # a non-interactive run (CI, a pipe at EOF)
    loader = {"model": load_model, "tokenizer": load_tokenizer, "reward": load_reward_model}[kind]
    with pytest.raises(UserError) as info:
        loader(directory)
    assert "trust_remote_code" in str(info.value) or "custom code" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["model", "tokenizer", "reward"])
def test_a_yes_on_stdin_does_not_run_remote_code(base_dir, tmp_path, kind):
    marker = tmp_path / "MARKER"
    directory = _remote_code_dir(base_dir, tmp_path / "m", marker, kind)
    result = _run_loader(kind, directory, tmp_path, stdin="y\n")  # e.g. `yes | posttrain ...`, a piped prompts file
    assert not marker.exists(), result.stdout[-300:]  # observed: the shipped code ran
    assert "USERERROR" in result.stdout, result.stdout + result.stderr
    assert "Do you wish to run the custom code" not in result.stdout  # no prompt: stdout may be the output


# =========================================================================== dtypes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_gives_every_parameter_that_dtype(base_dir, dtype):
    want = getattr(torch, dtype)
    stored = load_file(str(base_dir / "model.safetensors"))
    lm = load_model(base_dir, dtype=dtype)
    assert {p.dtype for p in lm.parameters()} == {want}
    state = lm.state_dict()
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor.to(want)), key

    rm = load_reward_model(base_dir, dtype=dtype)
    assert {p.dtype for p in rm.parameters()} == {want}
    assert rm.score.weight.shape == (1, rm.config.hidden_size) and rm.score.weight.dtype == want
    assert torch.equal(rm.model.embed_tokens.weight, stored["model.embed_tokens.weight"].to(want))
    assert rm.newly_initialized == ["score"]


@pytest.mark.parametrize("dtype", ["auto", "fp16", "float64", None])
def test_dtypes_outside_the_readme_list_are_config_errors(base_dir, dtype):
    for loader in (load_model, load_reward_model):
        with pytest.raises(ConfigError, match="model.dtype") as info:
            loader(base_dir, dtype=dtype)
        assert _one_line(info.value)


def test_config_schema_rejects_auto_dtype():
    from posttrain.config import SFTConfig

    with pytest.raises(ConfigError, match="dtype"):
        SFTConfig.from_dict({"model": {"path": PRESET, "dtype": "auto"}})


# =========================================================================== paths and clear errors


def test_relative_home_and_symlinked_paths_resolve_to_the_real_directory(base_dir, tmp_path, monkeypatch):
    model_dir = _copy_model_dir(base_dir, tmp_path / "home" / "models" / "m")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "home")
    assert resolve_model_path("models/m") == model_dir
    assert resolve_model_path("./models/../models/m") == model_dir
    assert resolve_model_path("~/models/m") == model_dir
    (tmp_path / "link").symlink_to(model_dir, target_is_directory=True)
    assert resolve_model_path(tmp_path / "link") == model_dir
    assert resolve_model_path(tmp_path / "link").is_absolute()
    assert next(load_model("~/models/m").parameters()).dtype == torch.float32
    assert load_tokenizer("models/m").pad_token == "<|pad|>"


def test_bad_paths_are_one_line_user_errors(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    cases = {"nope": "does not exist", "~/nope": "does not exist", str(tmp_path / "a_file"): "is a file",
             str(tmp_path / "empty"): "no config.json", str(tmp_path / "dangling"): "does not exist"}
    for path, message in cases.items():
        for loader in (resolve_model_path, load_model, load_tokenizer, load_reward_model):
            with pytest.raises(UserError, match=message) as info:
                loader(path)
            assert _one_line(info.value), (loader.__name__, path)
            assert "~" not in str(info.value)  # the expanded path is named


def _truncated(base_dir: Path, target: Path) -> Path:
    _copy_model_dir(base_dir, target)
    data = (base_dir / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted copy or download
    return target


@pytest.mark.parametrize("loader", [load_model, load_reward_model], ids=["causal", "reward"])
def test_truncated_weights_are_a_user_error(base_dir, tmp_path, loader):
    directory = _truncated(base_dir, tmp_path / "m")
    with pytest.raises(UserError, match="safetensors|truncated|incomplete"):
        loader(directory)


def test_config_not_matching_weights_is_a_user_error(base_dir, tmp_path):
    directory = _copy_model_dir(base_dir, tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["hidden_size"] = 32
    config["head_dim"] = 8
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as info:
        load_model(directory)
    assert _one_line(info.value)


# =========================================================================== tokenizer


def _tokenizer_dir(base_dir: Path, target: Path, drop: tuple[str, ...] = (), set_: dict | None = None) -> Path:
    target.mkdir()
    shutil.copy(base_dir / "tokenizer.json", target)
    config = json.loads((base_dir / "tokenizer_config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(set_ or {})
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_pad_falls_back_to_unk_when_there_is_no_eos(base_dir, tmp_path):
    directory = _tokenizer_dir(base_dir, tmp_path / "t", drop=("pad_token", "eos_token"),
                               set_={"unk_token": "<|endoftext|>"})
    tokenizer = load_tokenizer(directory)
    assert tokenizer.eos_token is None
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_no_pad_eos_or_unk_is_a_one_line_user_error(base_dir, tmp_path):
    directory = _tokenizer_dir(base_dir, tmp_path / "t", drop=("pad_token", "eos_token", "unk_token",
                                                               "extra_special_tokens"))
    raw = json.loads((directory / "tokenizer.json").read_text())
    for token in raw["added_tokens"]:  # no special token left to pad with either (`pad_fallback`)
        token["special"] = False
    (directory / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="no pad, eos or unk") as info:
        load_tokenizer(directory)
    assert _one_line(info.value)


def test_tokenizer_without_chat_template_falls_back_to_chatml(base_dir, tmp_path):
    from posttrain.data.templates import resolve_template

    directory = _tokenizer_dir(base_dir, tmp_path / "t", drop=("chat_template",))
    tokenizer = load_tokenizer(directory)
    assert not tokenizer.chat_template
    template = resolve_template(tokenizer, "auto")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Copy: a b"}], chat_template=template,
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nCopy: a b<|im_end|>\n<|im_start|>assistant\n"


# =========================================================================== presets


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tiny_preset_builds_bitwise_identical_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = presets.build_preset("tiny", tmp_path / "first")
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    torch.manual_seed(999)  # a different global RNG must not change the build
    second = presets.build_preset("tiny", tmp_path / "second")
    assert _digest(first) == _digest(second)
    weights = load_file(str(first / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert sum(t.numel() for t in weights.values()) == 922_752  # tied head stored once


def test_preset_build_ignores_the_callers_default_dtype(base_dir, tmp_path):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        built = presets.build_preset(PRESET, tmp_path / "b")
    finally:
        torch.set_default_dtype(previous)
    assert _digest(built)["model.safetensors"] == _digest(base_dir)["model.safetensors"]


def test_preset_tokenizer_round_trips_the_bundled_corpus(base_dir):
    tokenizer = load_tokenizer(PRESET)
    text = presets.corpus_path().read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) > 100
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == line
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < len(tokenizer) and tokenizer.unk_token_id is None
    # no bos added by default, as build_tokenizer documents
    assert tokenizer("a b")["input_ids"] == tokenizer("a b", add_special_tokens=False)["input_ids"]


# =========================================================================== reward-model loading


def test_lora_reward_model_keeps_the_given_pad_token(base_dir, tmp_path):
    from posttrain.config.sections import LoraConfig
    from posttrain.models.reward_model import add_lora

    base = _copy_model_dir(base_dir, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    del config["pad_token_id"]
    (base / "config.json").write_text(json.dumps(config))
    plain = load_reward_model(base, pad_token_id=3)
    assert plain.config.pad_token_id == 3  # the full-model path honours it
    add_lora(plain, LoraConfig(r=2)).save_pretrained(tmp_path / "rm")
    adapter_config = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    loaded = load_reward_model(tmp_path / "rm", pad_token_id=3)
    assert loaded.config.pad_token_id == 3  # observed: None
    with torch.no_grad():
        loaded(input_ids=torch.tensor([[5, 6, 7], [5, 6, 3]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))

"""Stop 30, precision: merge into a low-precision base, AdamW's float32 moments for bfloat16 /
float16 weights (every optimizer path, the checkpoint, the memory estimate), margins and scores
float32 cannot hold, and DPO / cDPO at a rejected response of probability 0."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.train.optim import AdamW


# --------------------------------------------------------------------------- merge


def _bfloat16_base_and_adapter(tmp_path):
    """tiny-2l saved in bfloat16 as a base, and a LoRA (float32, nudged off zero) trained on it."""
    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters
    from posttrain.models.loading import load_model, load_tokenizer, save_model

    base = tmp_path / "base"
    load_model("tiny-2l", dtype="bfloat16").save_pretrained(base)
    load_tokenizer("tiny-2l").save_pretrained(base)
    model = apply_adapters(load_model(str(base)), AdapterConfig(method=["lora"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return base, save_model(model, load_tokenizer(str(base)), tmp_path / "adapter")


def _exact_merges(base, adapter):
    """{weight name: (W + s·B·A in float64, W's numel)} for the adapted weights."""
    from safetensors.torch import load_file

    weights = load_file(str(base / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    exact = {}
    for name, weight in weights.items():
        stem = name.removesuffix(".weight")
        a = [v for k, v in lora.items() if f"{stem}.lora_A" in k]
        b = [v for k, v in lora.items() if f"{stem}.lora_B" in k]
        if a:
            exact[name] = weight.double() + scale * (b[0].double() @ a[0].double())
    assert exact
    return exact


def test_merge_keeps_a_bfloat16_checkpoints_dtype_and_rounds_once(tmp_path, capsys):
    """No --dtype: the merged model is bfloat16 like its base (config too), each adapted weight
    W + ΔW rounded once; --dtype float32 keeps W + ΔW unrounded."""
    from safetensors.torch import load_file

    from tests.cli_runner import run_cli

    base, adapter = _bfloat16_base_and_adapter(tmp_path)
    exact = _exact_merges(base, adapter)
    rc, text = run_cli(capsys, "merge", adapter, tmp_path / "kept")
    assert rc == 0 and "(bfloat16)" in text, text
    merged = load_file(str(tmp_path / "kept" / "model.safetensors"))
    assert {w.dtype for w in merged.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    differing = sum(int((merged[n] != e.to(torch.bfloat16)).sum()) for n, e in exact.items())
    assert differing <= 1e-3 * sum(e.numel() for e in exact.values())

    rc, text = run_cli(capsys, "merge", adapter, tmp_path / "wide", "--dtype", "float32")
    assert rc == 0 and "(float32)" in text, text
    merged = load_file(str(tmp_path / "wide" / "model.safetensors"))
    assert {w.dtype for w in merged.values()} == {torch.float32}
    for name, e in exact.items():
        torch.testing.assert_close(merged[name].double(), e, rtol=1e-6, atol=1e-7)


def test_checkpoint_dtype_reads_the_stored_weights(tmp_path):
    from safetensors.torch import save_file

    from posttrain.inference import _checkpoint_dtype

    for stored, expected in [((torch.bfloat16,), "bfloat16"), ((torch.float16, torch.int64), "float16"),
                             ((torch.float32,), "float32"), ((torch.float64,), "float32"),
                             ((torch.bfloat16, torch.float32), "float32"), ((torch.bfloat16, torch.float16), "float32")]:
        folder = tmp_path / expected / str(len(stored))
        folder.mkdir(parents=True, exist_ok=True)
        save_file({f"w{i}": torch.zeros(2, dtype=d) for i, d in enumerate(stored)}, str(folder / "model.safetensors"))
        assert _checkpoint_dtype(folder) == expected, stored


# --------------------------------------------------------------------------- AdamW's moments


def test_float16_weights_have_float32_moments_and_the_update_rounded_once():
    """The update equals torch's AdamW on a float32 copy, rounded to float16, step after step."""
    weight = torch.nn.Parameter(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).half())
    master = torch.nn.Parameter(weight.detach().float())
    ours, reference = AdamW([weight], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([master], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(6, 3, generator=g).half()
        weight.grad, master.grad = grad, grad.float()
        ours.step()
        reference.step()
        with torch.no_grad():
            master.copy_(master.half())
        assert torch.equal(weight.float(), master)
    assert {k: v.dtype for k, v in ours.state[weight].items()} == {
        "step": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}


def test_gradscaler_path_with_a_bfloat16_weight_unscales_and_skips_in_float32():
    """A GradScaler sets grad_scale / found_inf for the fused kernel: a bfloat16 weight's float32
    update unscales its gradient and is skipped on an overflow, as torch's fused step is."""
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).bfloat16())
    master = torch.nn.Parameter(weight.detach().float())
    ours = AdamW([weight], lr=1e-2, fused=True)
    reference = torch.optim.AdamW([master], lr=1e-2, fused=True)
    g = torch.Generator().manual_seed(1)
    for found in (0.0, 1.0, 0.0):
        grad = (torch.randn(4, 3, generator=g) * 8).bfloat16()
        weight.grad, master.grad = grad, grad.float()
        before = weight.detach().clone()
        for optimizer in (ours, reference):
            optimizer.grad_scale, optimizer.found_inf = torch.tensor(8.0), torch.tensor(found)
            optimizer.step()
            del optimizer.grad_scale, optimizer.found_inf
        with torch.no_grad():
            master.copy_(master.bfloat16())
        assert torch.equal(weight.float(), master)
        assert torch.equal(weight, before) == bool(found)
    assert ours.state[weight]["exp_avg_sq"].dtype == torch.float32
    assert float(ours.state[weight]["step"]) == 2


def test_an_older_checkpoints_bfloat16_moments_load_as_float32_and_amsgrad_too():
    weight = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.bfloat16))
    old = torch.optim.AdamW([torch.nn.Parameter(weight.detach().clone())], lr=1e-3, amsgrad=True)
    old.param_groups[0]["params"][0].grad = torch.ones(3, 2, dtype=torch.bfloat16)
    old.step()
    saved = old.state_dict()
    assert saved["state"][0]["exp_avg_sq"].dtype == torch.bfloat16  # torch's: the weight's dtype
    ours = AdamW([weight], lr=1e-3, amsgrad=True)
    ours.load_state_dict(saved)
    state = ours.state[weight]
    assert {k: v.dtype for k, v in state.items() if k != "step"} == dict.fromkeys(
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), torch.float32)
    weight.grad = torch.ones(3, 2, dtype=torch.bfloat16)
    ours.step()
    assert float(state["step"]) == 2 and state["max_exp_avg_sq"].dtype == torch.float32


def test_memory_estimate_counts_float32_moments_for_bfloat16_weights():
    from posttrain.models.adapters import parameter_report

    model = torch.nn.Linear(256, 256, bias=False).to(torch.bfloat16)
    memory = parameter_report(model)["memory_mib"]
    numel = 256 * 256
    assert memory["weights"] == memory["gradients"] == pytest.approx(2 * numel / 2**20)
    assert memory["optimizer"] == pytest.approx(8 * numel / 2**20)
    assert parameter_report(model, "adamw_8bit")["memory_mib"]["optimizer"] == pytest.approx(2 * numel / 2**20)


# --------------------------------------------------------------------------- numbers float32 cannot hold


@pytest.mark.parametrize("row,what", [
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1e39}, "'margin'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "4e38"}, "'margin'"),  # a CSV cell
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 10**39}, "'margin'"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 1e39]}, "'scores' entry 2"),
])
def test_numbers_beyond_float32_range_are_bad_rows(row, what):
    from posttrain.data.formats import BadRowError
    from posttrain.data.preferences import detect_preference_format, to_preference_record

    with pytest.raises(BadRowError, match=f"{what} is .*expected a finite number within float32 range"):
        to_preference_record(row, detect_preference_format([row]))


def test_the_largest_float32_margin_is_kept():
    from posttrain.data.preferences import detect_preference_format, to_preference_record

    row = {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float(torch.finfo(torch.float32).max)}
    assert to_preference_record(row, detect_preference_format([row])).margin == float(torch.finfo(torch.float32).max)


# --------------------------------------------------------------------------- DPO at probability 0


def test_dpo_at_a_rejected_probability_of_zero_has_the_formulas_value_and_no_nan_gradient():
    """ε = 0: loss 0 and finite gradients; ε > 0: cDPO's −ε log σ(−βh) is +inf there, as the
    formula says (not NaN)."""
    from posttrain.losses.preference import dpo_loss

    inputs = [torch.tensor([v, v + 1.0], requires_grad=True) for v in (-3.0, -math.inf, -4.0, -4.0)]
    with torch.no_grad():
        inputs[1][1] = -5.0
    losses = dpo_loss(*inputs, 0.1)[0]
    assert float(losses[0].detach()) == 0.0 and math.isfinite(float(losses[1].detach()))
    losses.sum().backward()
    assert all(bool(torch.isfinite(x.grad).all()) for x in inputs)
    smoothed = dpo_loss(*[x.detach() for x in inputs], 0.1, label_smoothing=0.1)[0]
    assert math.isinf(float(smoothed[0])) and float(smoothed[0]) > 0
    beta_h = 0.1 * ((-2.0 + 3.0) - (-5.0 + 3.0))
    expected = -0.9 * math.log(1 / (1 + math.exp(-beta_h))) - 0.1 * math.log(1 / (1 + math.exp(beta_h)))
    assert float(smoothed[1]) == pytest.approx(expected, rel=1e-6)

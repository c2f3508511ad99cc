"""The parameter report printed at the start of a run and saved as params.json.

Counts trainable / total parameters per method (lora, prompt, bottleneck, base, …) and per
module type (q_proj, mlp, embed_tokens, …), and estimates the memory of weights, gradients
and optimizer state:

    weights    Σ numel × bytes of its dtype (4-bit weights: ½ byte + 1 scale byte per 64)
    gradients  trainable numel × bytes of its dtype
    optimizer  AdamW: 2 moments × trainable numel × 4 bytes (float32 moments for bfloat16 / float16
               weights too, see train/optim.py; float64 weights: 8 bytes; 8-bit AdamW: 1 byte each)

Activations depend on batch and length and are not estimated; the loop measures peak memory.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn


def _module_type(name: str, method: str) -> str:
    """q_proj for 'model.layers.0.self_attn.q_proj.lora_A.default.weight', embed_tokens, norm, …;
    bottleneck adapters are named after the module they follow, virtual tokens after their method."""
    if method in ("prompt", "prefix"):
        return f"{method}_tokens"
    parts = [p for p in name.split(".") if not p.isdigit() and p not in ("default", "weight", "bias", "base_layer")]
    if method == "bottleneck":  # bottlenecks.adapters.model__layers__0__mlp.down.weight
        return "bottleneck_after_" + parts[2].split("__")[-1]
    for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "ia3_l"):
        if marker in parts:
            return parts[parts.index(marker) - 1]
    return parts[-1] if parts else name


def _bytes(param) -> float:
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * (0.5 + 1 / 64)  # packed: two 4-bit values per stored byte
    return param.numel() * param.element_size()


def parameter_report(model: nn.Module, optimizer: str = "adamw") -> dict:
    """Counts and memory estimates; see the module docstring."""
    method_of = getattr(model, "method_of", lambda _name: "base")
    by_method: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_module: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    weights = grads = state = total = trainable = 0
    for name, param in model.named_parameters():
        numel = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)
        method = method_of(name)
        module = _module_type(name, method)
        total += numel
        by_method[method][1] += numel
        by_module[module][1] += numel
        weights += _bytes(param)
        if param.requires_grad:
            trainable += numel
            by_method[method][0] += numel
            by_module[module][0] += numel
            grads += param.numel() * param.element_size()
            state += 2 * param.numel() * (1 if "8bit" in optimizer else max(4, param.element_size()))
    mib = 1 / 2**20
    return {
        "trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0,
        "by_method": {k: {"trainable": v[0], "total": v[1]} for k, v in sorted(by_method.items())},
        "by_module": {k: {"trainable": v[0], "total": v[1]} for k, v in sorted(by_module.items())},
        "memory_mib": {"weights": weights * mib, "gradients": grads * mib,
                       "optimizer": state * mib, "total": (weights + grads + state) * mib},
    }


def _summary_line(report: dict) -> str:
    return f"trainable {report['trainable']:,} / {report['total']:,} params ({report['percent']:.3f}%)"


def format_report(report: dict) -> str:
    lines = [_summary_line(report)]
    methods = [(k, v) for k, v in report["by_method"].items() if v["trainable"] or k != "base"]
    lines.append("  by method: " + ", ".join(f"{k} {v['trainable']:,}" for k, v in methods))
    modules = [(k, v) for k, v in report["by_module"].items() if v["trainable"]]
    lines.append("  trained modules: " + ", ".join(f"{k} {v['trainable']:,}" for k, v in modules))
    m = report["memory_mib"]
    lines.append(f"  memory estimate: weights {m['weights']:.1f} MiB + gradients {m['gradients']:.1f} MiB"
                 f" + optimizer {m['optimizer']:.1f} MiB = {m['total']:.1f} MiB (activations not included)")
    return "\n".join(lines)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    report = parameter_report(model)
    return report["trainable"], report["total"]


def trainable_summary(model: nn.Module) -> str:
    """E.g. "trainable 12,288 / 1,034,752 params (1.188%)": the report's first line."""
    return _summary_line(parameter_report(model))

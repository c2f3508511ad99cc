"""Parameter-efficient fine-tuning: every method behind one `adapter:` config section.

    spec.py        which methods, staged schedule, checks before loading anything
    build.py       fresh adapters on a loaded model (peft for LoRA/DoRA/IA3/prompt/prefix)
    bottleneck.py  Houlsby bottleneck adapters (ours; peft has none)
    model.py       AdaptedModel: a causal LM carrying any mix of them
    io.py          save / load / merge (or stream the merged weights) / combine
    report.py      trainable parameters and memory estimate
"""

from posttrain.models.adapters.build import apply_adapters, apply_freeze_tuning, linear_module_names
from posttrain.models.adapters.io import (
    combine_adapters,
    is_adapter_dir,
    load_adapted,
    merge_adapted,
    merged_weights,
    read_layout,
    save_adapted,
)
from posttrain.models.adapters.model import AdaptedModel
from posttrain.models.adapters.report import count_parameters, format_report, parameter_report, trainable_summary
from posttrain.models.adapters.spec import AdapterPlan, plan_adapters, validate_adapter

__all__ = [
    "AdaptedModel", "AdapterPlan", "apply_adapters", "apply_freeze_tuning", "combine_adapters", "count_parameters",
    "format_report", "is_adapter_dir", "linear_module_names", "load_adapted", "merge_adapted", "merged_weights",
    "parameter_report", "plan_adapters", "read_layout", "save_adapted", "trainable_summary", "validate_adapter",
]

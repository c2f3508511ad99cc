"""posttrain: post-training for language models.

The Python API mirrors the CLI: build a config, call the stage, get a run directory.

    from posttrain import SFTConfig, run_sft
    cfg = SFTConfig.from_dict({"model": {"path": "tiny"}, "train": {"max_steps": 50}})
    run_dir = run_sft(cfg)

Every training and data command has its pair: RMConfig / run_rm, DPOConfig / run_dpo (kto, orpo: dpo.loss),
GRPOConfig / run_grpo (rloo: grpo.advantage), PPOConfig / run_ppo, RLAIFConfig / run_rlaif,
ConstitutionalConfig / run_constitutional, SelfInstructConfig / run_self_instruct,
QualityConfig / run_quality, RedTeamConfig / run_redteam, EvaluateConfig / run_evaluate;
and run_pipeline(path, overrides).
"""

__version__ = "0.1.0"

# name -> (module, attribute); imported on first use: `import posttrain` stays cheap (no torch)
_LAZY = {
    "SFTConfig": ("posttrain.config", "SFTConfig"), "run_sft": ("posttrain.train.sft", "run_sft"),
    "RMConfig": ("posttrain.config", "RMConfig"), "run_rm": ("posttrain.train.reward", "run_rm"),
    "DPOConfig": ("posttrain.config", "DPOConfig"), "run_dpo": ("posttrain.train.preference", "run_dpo"),
    "GRPOConfig": ("posttrain.config", "GRPOConfig"), "run_grpo": ("posttrain.train.grpo", "run_grpo"),
    "PPOConfig": ("posttrain.config", "PPOConfig"), "run_ppo": ("posttrain.train.ppo", "run_ppo"),
    "RLAIFConfig": ("posttrain.config", "RLAIFConfig"), "run_rlaif": ("posttrain.feedback.rlaif", "run_rlaif"),
    "ConstitutionalConfig": ("posttrain.config.synthesis", "ConstitutionalConfig"),
    "run_constitutional": ("posttrain.feedback.constitutional", "run_constitutional"),
    "SelfInstructConfig": ("posttrain.config.synthesis", "SelfInstructConfig"),
    "run_self_instruct": ("posttrain.feedback.self_instruct", "run_self_instruct"),
    "QualityConfig": ("posttrain.config.quality", "QualityConfig"),
    "run_quality": ("posttrain.data.quality.run", "run_quality"),
    "RedTeamConfig": ("posttrain.config.safety", "RedTeamConfig"), "run_redteam": ("posttrain.safety.run", "run_redteam"),
    "EvaluateConfig": ("posttrain.config.evaluate", "EvaluateConfig"),
    "run_evaluate": ("posttrain.eval.alignment", "run_evaluate"),
    "run_pipeline": ("posttrain.pipeline", "run_pipeline"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    """PEP 562: the lazily imported API too, for dir() and a notebook's tab completion."""
    return sorted({*globals(), *_LAZY})

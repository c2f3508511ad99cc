"""Typed configs: one dataclass per stage, YAML in, dotted overrides on top.

Every field carries a one-line description (`help`). That single source feeds
`posttrain sft --help`, validation of YAML files and the README's config reference
(`python -m posttrain.config` prints it). Unknown keys are rejected before any work
starts, with the closest valid key.

    schema.py       the machinery: option(), loading, overrides, type checks, reference tables
    sections.py     model, adapter, data, train, eval; SFTConfig
    preference.py   RMConfig, DPOConfig
    rl.py           GRPOConfig, PPOConfig
    feedback.py     BackendConfig, JudgeConfig, RLAIFConfig (AI feedback)
    synthesis.py    ConstitutionalConfig, SelfInstructConfig (training data from a model's outputs)
    quality.py      QualityConfig (the training-data quality pass)
    safety.py       RedTeamConfig (red-team and over-refusal evaluation)
    evaluate.py     EvaluateConfig (the alignment report)
"""

from posttrain.config.feedback import (BackendConfig, JudgeConfig, RLAIFConfig, RLAIFDataConfig, RLAIFLoopConfig,
                                       rlaif_reference, validate_rlaif)
from posttrain.config.preference import (DPOConfig, DPOLossConfig, PreferenceDataConfig, RewardConfig, RMConfig,
                                         preference_reference, validate_dpo, validate_rm)
from posttrain.config.rl import (GRPOConfig, GRPOLossConfig, PPOConfig, PPOLossConfig, PPORolloutConfig,
                                 PromptDataConfig, RLEvalConfig, RLRewardConfig, RolloutConfig, rl_reference,
                                 validate_grpo, validate_ppo)
from posttrain.config.evaluate import EvaluateConfig, evaluate_reference, validate_evaluate
from posttrain.config.quality import QualityConfig, quality_reference, validate_quality
from posttrain.config.safety import RedTeamConfig, redteam_reference, validate_redteam
from posttrain.config.schema import apply_override, markdown_reference, option, read_yaml, section_values
from posttrain.config.sections import (AdapterConfig, BottleneckConfig, DataConfig, EvalConfig, ForgettingConfig,
                                       FreezeTuningConfig,
                                       IA3Config, LoraConfig, ModelConfig, QuantizationConfig, SFTConfig, TrainConfig,
                                       VirtualTokensConfig, validate_sft)
from posttrain.config.synthesis import (ConstitutionalConfig, SelfInstructConfig, synthesis_reference,
                                        validate_constitutional, validate_self_instruct)

__all__ = [
    "ConstitutionalConfig", "SelfInstructConfig", "synthesis_reference", "validate_constitutional",
    "validate_self_instruct",
    "AdapterConfig", "BackendConfig", "BottleneckConfig", "DPOConfig", "DPOLossConfig", "DataConfig", "EvalConfig",
    "ForgettingConfig", "FreezeTuningConfig", "GRPOConfig", "GRPOLossConfig", "IA3Config", "JudgeConfig", "LoraConfig", "ModelConfig",
    "PPOConfig", "PPOLossConfig", "PPORolloutConfig", "PreferenceDataConfig", "PromptDataConfig", "QualityConfig",
    "QuantizationConfig", "quality_reference", "validate_quality", "RedTeamConfig", "redteam_reference",
    "validate_redteam", "EvaluateConfig", "evaluate_reference", "validate_evaluate",
    "RLAIFConfig", "RLAIFDataConfig", "RLAIFLoopConfig", "RLEvalConfig", "RLRewardConfig", "RMConfig", "RewardConfig",
    "RolloutConfig", "SFTConfig", "TrainConfig", "VirtualTokensConfig", "apply_override", "markdown_reference",
    "option", "preference_reference", "read_yaml", "rl_reference", "rlaif_reference", "section_values", "validate_dpo",
    "validate_grpo", "validate_ppo", "validate_rlaif", "validate_rm", "validate_sft",
]

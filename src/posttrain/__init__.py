"""posttrain: post-training for language models.

The Python API mirrors the CLI: build a config, call the stage, get a run directory.

    from posttrain import SFTConfig, run_sft
    cfg = SFTConfig.from_dict({"model": {"path": "tiny"}, "train": {"max_steps": 50}})
    run_dir = run_sft(cfg)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["SFTConfig", "run_sft", "__version__"]


def __getattr__(name: str):
    # Lazy: `import posttrain` must stay cheap (no torch import at import time).
    if name == "SFTConfig":
        from posttrain.config import SFTConfig

        return SFTConfig
    if name == "run_sft":
        from posttrain.train.sft import run_sft

        return run_sft
    raise AttributeError(name)

"""trl-ext: extra preference and SFT losses as drop-in subclasses of TRL's trainers."""

from .quiet_imports import without_bitsandbytes_cpu_kernel_notice

with without_bitsandbytes_cpu_kernel_notice():
    import bitsandbytes  # noqa: F401  (imported by peft anyway; logs its CPU-kernel notice once, at import)

from .citations import Citation
from .embedded import resolve_model_name
from .generation_eval import GenerationEvalCallback
from .losses import (
    LossContext,
    PreferenceLogps,
    PreferenceLossOutput,
    SFTLogps,
    SFTLossOutput,
    register_dpo_loss,
    register_sft_loss,
    registered_dpo_losses,
    registered_sft_losses,
)
from .trainers import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

__version__ = "0.1.0"

__all__ = [
    "Citation",
    "LossContext",
    "DPOConfig",
    "DPOTrainer",
    "GenerationEvalCallback",
    "PreferenceLogps",
    "PreferenceLossOutput",
    "register_dpo_loss",
    "registered_dpo_losses",
    "resolve_model_name",
    "SFTConfig",
    "SFTLogps",
    "SFTLossOutput",
    "SFTTrainer",
    "register_sft_loss",
    "registered_sft_losses",
]

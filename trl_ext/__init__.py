"""trl-ext: extra preference and SFT losses as drop-in subclasses of TRL's trainers."""

from .dpo import DPOConfig, DPOTrainer
from .dpo_losses import PreferenceLogps, PreferenceLossOutput, register_dpo_loss, registered_dpo_losses
from .embedded import resolve_model_name
from .generation_eval import GenerationEvalCallback
from .sft import SFTConfig, SFTTrainer

__version__ = "0.1.0"

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "GenerationEvalCallback",
    "PreferenceLogps",
    "PreferenceLossOutput",
    "register_dpo_loss",
    "registered_dpo_losses",
    "resolve_model_name",
    "SFTConfig",
    "SFTTrainer",
]

"""trl_ext's trainers: drop-in subclasses of TRL's, and the features that change how their steps run.

- `dpo_config.py`, `dpo.py`: `DPOConfig`, `DPOTrainer` (TRL's DPO losses plus the registered ones)
- `sft_config.py`, `sft.py`: `SFTConfig`, `SFTTrainer` (TRL's `nll`/`dft` plus the registered ones)
- `stepwise_dpo.py`: stepwise DPO (sDPO): the policy becomes the reference at each stage boundary
- `vocabulary_kl.py`: the per-position KL over the vocabulary that TDPO reads
- `reference.py`: the SFT losses' frozen reference model and its precomputed log-probs
- `ift_inputs.py`: IFT's first pass and mixed inputs
- `packed.py`: per-sequence rows of padded or packed batches
- `saving.py`: saving and resuming under FSDP
- `model_card.py`: the model card citing the losses trained
"""

from .dpo import DPOTrainer
from .dpo_config import DPOConfig
from .sft import SFTTrainer
from .sft_config import SFTConfig

__all__ = ["DPOConfig", "DPOTrainer", "SFTConfig", "SFTTrainer"]

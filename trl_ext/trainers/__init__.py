"""trl_ext's trainers: drop-in subclasses of TRL's, and the features that change how their steps run.

- `dpo.py`: `DPOConfig`, `DPOTrainer` (TRL's DPO losses plus the registered ones)
- `sft.py`: `SFTConfig`, `SFTTrainer` (TRL's `nll`/`dft` plus the registered ones)
- `stepwise_dpo.py`: stepwise DPO (sDPO): the policy becomes the reference at each stage boundary
- `vocabulary_kl.py`: the per-position KL over the vocabulary that TDPO reads
- `reference.py`: the SFT losses' frozen reference model and its precomputed log-probs
- `ift_inputs.py`: IFT's first pass and mixed inputs
- `packed.py`: per-sequence rows of padded or packed batches
- `saving.py`: saving and resuming under FSDP
- `model_card.py`: the model card citing the losses trained
"""

from .dpo import DPOConfig, DPOTrainer
from .sft import SFTConfig, SFTTrainer

__all__ = ["DPOConfig", "DPOTrainer", "SFTConfig", "SFTTrainer"]

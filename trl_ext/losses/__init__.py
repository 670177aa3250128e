"""Every loss trl-ext adds, one module per family holding its math (small documented tensor functions) and its
registration, and the registry through which users add their own.

DPO family, for `DPOConfig.loss_type`:
- `dpop`, `dpop_norm`: `dpop.py`
- `cdpo`: `cdpo.py`
- `rdpo`: `rdpo.py`
- `npo`: `npo.py`
- `beta_dpo`: `beta_dpo.py`
- `tdpo1`, `tdpo2`: `tdpo.py`

SFT family, for `SFTConfig.loss_type`:
- `kl_sft`: `kl_sft.py`
- `ift`: `ift.py`

`registry.py` holds `register_dpo_loss` / `register_sft_loss`; `inputs.py` the batches a loss receives and what it
returns. TRL's own loss types are TRL's, untouched (listed in `trl_ext.trl_contract`).
"""

# Each family registers its losses on import, in this order (the order error messages list them in)
from . import dpop, cdpo, rdpo, npo, beta_dpo, tdpo, kl_sft, ift  # noqa: F401, I001
from .inputs import LossContext, PreferenceLogps, PreferenceLossOutput, SFTLogps, SFTLossOutput, sequence_mean
from .registry import (
    check_finite_at_least,
    compute_dpo_loss,
    compute_sft_loss,
    register_dpo_loss,
    register_sft_loss,
    registered_dpo_loss,
    registered_dpo_losses,
    registered_sft_loss,
    registered_sft_losses,
)

__all__ = [
    "LossContext", "PreferenceLogps", "PreferenceLossOutput", "SFTLogps", "SFTLossOutput", "check_finite_at_least",
    "compute_dpo_loss", "compute_sft_loss", "register_dpo_loss", "register_sft_loss", "registered_dpo_loss",
    "registered_dpo_losses", "registered_sft_loss", "registered_sft_losses", "sequence_mean",
]

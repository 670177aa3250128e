"""Pairwise preference losses by name: the extension point of `trl_ext.DPOTrainer`.

TRL 0.29 folded its DPO losses into one private method, so a custom loss could no longer be plugged in without
copying it. Here a loss is a function of the per-sequence log-probabilities TRL already computes:

```python
import torch.nn.functional as F
from trl_ext import DPOConfig, PreferenceLogps, register_dpo_loss


@register_dpo_loss("my_margin")
def my_margin_loss(batch: PreferenceLogps, config: DPOConfig):
    margin = batch.chosen_logratios - batch.rejected_logratios
    return -F.logsigmoid(config.beta * margin - 1.0)  # (B,) per-pair losses


DPOConfig(loss_type=["sigmoid", "my_margin"], loss_weights=[1.0, 0.5])
```

A loss returns either the `(B,)` per-pair losses or a [`PreferenceLossOutput`] that also carries per-pair metrics;
the trainer averages the losses, weights them by `loss_weights`, and logs each metric `key` as `"{name}/{key}"`
(averaged over pairs and processes), in train and eval. Register before building the `DPOConfig`, which rejects
unknown names.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .losses import dpop_loss
from .trl_contract import TRL_DPO_LOSS_TYPES

@dataclass(frozen=True)
class PreferenceLogps:
    """Per-sequence log-probabilities of one batch of `B` preference pairs.

    Log-probabilities are summed over the completion tokens (TRL's convention). All tensors are `(B,)`; the policy
    ones carry gradient, the reference ones do not.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # completion tokens of each chosen completion (float)
    rejected_lengths: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    def length_normalized(self) -> "PreferenceLogps":
        """The same batch with every log-probability averaged over its completion tokens instead of summed."""
        chosen_lengths = self.chosen_lengths.clamp(min=1)
        rejected_lengths = self.rejected_lengths.clamp(min=1)
        return replace(
            self,
            chosen_logps=self.chosen_logps / chosen_lengths,
            rejected_logps=self.rejected_logps / rejected_lengths,
            ref_chosen_logps=self.ref_chosen_logps / chosen_lengths,
            ref_rejected_logps=self.ref_rejected_logps / rejected_lengths,
        )


@dataclass
class PreferenceLossOutput:
    """Per-pair losses `(B,)` and per-pair metrics `{key: (B,)}` of a registered loss."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


PreferenceLossFn = Callable[[PreferenceLogps, "DPOConfig"], "torch.Tensor | PreferenceLossOutput"]  # noqa: F821

_REGISTRY: dict[str, PreferenceLossFn] = {}


def register_dpo_loss(name: str) -> Callable[[PreferenceLossFn], PreferenceLossFn]:
    """Decorator that makes `name` a valid `DPOConfig.loss_type` computed by the decorated function.

    The function receives a [`PreferenceLogps`] and the trainer's `DPOConfig` (subclass it to add hyperparameters)
    and returns `(B,)` per-pair losses or a [`PreferenceLossOutput`]. Names of TRL's own losses cannot be taken.
    Registering a name again replaces the earlier function with a warning (re-running a notebook cell).
    """
    if name in TRL_DPO_LOSS_TYPES:
        raise ValueError(f"`{name}` is one of TRL's own DPO loss types and cannot be registered again.")

    def decorator(fn: PreferenceLossFn) -> PreferenceLossFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            warnings.warn(f"Replacing the DPO loss `{name}` ({_REGISTRY[name].__qualname__}) with "
                          f"{fn.__qualname__}.", stacklevel=2)
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_dpo_losses() -> tuple[str, ...]:
    """Names of the losses registered with [`register_dpo_loss`] (trl_ext's own and the user's)."""
    return tuple(_REGISTRY)


def compute_registered_loss(name: str, batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """Runs the loss registered as `name` and normalizes its result to a [`PreferenceLossOutput`]."""
    result = _REGISTRY[name](batch, config)
    return result if isinstance(result, PreferenceLossOutput) else PreferenceLossOutput(result)


def _dpop_output(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    losses, penalty = dpop_loss(batch.chosen_logratios, batch.rejected_logratios, config.beta, config.dpop_lambda)
    active = (batch.chosen_logratios < 0).float()
    return PreferenceLossOutput(losses, {"penalty": penalty.detach(), "active": active})


@register_dpo_loss("dpop")
def dpop(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """DPOP on summed log-probabilities, as in the paper."""
    return _dpop_output(batch, config)


@register_dpo_loss("dpop_norm")
def dpop_norm(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """DPOP on per-token averaged log-probabilities (the length-normalised variant, cf. TRL's `sigmoid_norm`)."""
    return _dpop_output(batch.length_normalized(), config)

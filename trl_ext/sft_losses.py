"""SFT losses by name: the extension point of `trl_ext.SFTTrainer`, and KL-SFT's registration.

A loss that only needs the log-probabilities of TRL's own forward (and, with `reference=True`, the reference
model's) is a function of per-sequence rows of per-token log-probs, added to TRL's NLL:

```python
from trl_ext import SFTConfig, SFTLogps, SFTLossOutput, register_sft_loss
from trl_ext.losses import sequence_mean


@register_sft_loss("mean_logratio", reference=True)
def mean_logratio(batch: SFTLogps, config: SFTConfig):
    drift = sequence_mean(batch.policy_token_logps - batch.ref_token_logps, batch.mask)  # (S,)
    return SFTLossOutput(0.1 * drift.abs(), metrics={"mean_logratio/drift": drift})


SFTConfig(loss_type="mean_logratio")
```

A loss returns the `(S,)` per-sequence values, or an `SFTLossOutput` that also carries metrics. The trainer adds the
mean of the per-sequence values (over every process's sequences, with TRL's
`average_tokens_across_devices`) to TRL's NLL, and logs each metric under its key, averaged over sequences and
processes. A loss that needs a pass of its own declares `extra_pass=True` and replaces `compute_loss`: it is called
as `fn(trainer, model, inputs, return_outputs, num_items_in_batch)` (IFT is registered so, in `trl_ext.ift`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import losses
from .citations import Citation
from .registry import LossRegistry
from .trl_contract import TRL_SFT_LOSS_TYPES


@dataclass(frozen=True)
class SFTLogps:
    """One SFT batch as `S` per-sequence rows (a packed row is split into its sequences), `(S, T)` each.

    `policy_token_logps` carries gradient; `ref_token_logps` is the reference's (`None` unless the loss was registered
    with `reference=True`); `mask` is 1 on the target tokens. `nll` is TRL's loss term, detached: the mean NLL per
    target token over the batch of every process.
    """

    policy_token_logps: torch.Tensor
    ref_token_logps: torch.Tensor | None
    mask: torch.Tensor
    nll: torch.Tensor


@dataclass
class SFTLossOutput:
    """Per-sequence values `(S,)` added to TRL's NLL, and metrics `{key: tensor}` logged under `key` as given."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RegisteredSFTLoss:
    """An SFT loss function and what its registration declared."""

    fn: Callable
    reference: bool = False
    extra_pass: bool = False
    citation: Citation | None = None


_REGISTRY = LossRegistry("SFT", TRL_SFT_LOSS_TYPES)


def register_sft_loss(
    name: str, *, reference: bool = False, extra_pass: bool = False, citation: Citation | None = None
) -> Callable[[Callable], Callable]:
    """Decorator that makes `name` a valid `SFTConfig.loss_type` computed by the decorated function.

    Args:
        reference: the loss reads a frozen reference model's per-token log-probs (`SFTLogps.ref_token_logps`). The
            trainer then holds one: `ref_model`, the PEFT model with its adapter disabled, a frozen copy of a
            starting adapter, or a frozen copy of the model; or `precompute_ref_log_probs=True` computes them once
            before training. Other losses refuse `precompute_ref_log_probs`.
        extra_pass: the loss runs passes of its own, outside the model's forward; it is called with the trainer
            in place of `compute_loss`, and the trainer refuses FSDP and DeepSpeed ZeRO-3, whose sharded parameters
            such a pass cannot read.
        citation: the loss's paper: the model card cites it and tags the model with `name`.

    Names of TRL's own losses cannot be taken; registering a name again replaces it with a warning.
    """
    return _REGISTRY.decorator(name, lambda fn: RegisteredSFTLoss(fn, reference, extra_pass, citation))


def registered_sft_losses() -> tuple[str, ...]:
    """Names of the losses registered with [`register_sft_loss`] (trl_ext's own and the user's)."""
    return _REGISTRY.names()


def registered_sft_loss(name: str) -> RegisteredSFTLoss:
    """What `name` was registered with."""
    return _REGISTRY[name]


KL_PENALTIES = {"sq_logratio": losses.sq_logratio_penalty, "token_kl": losses.token_kl_penalty}


@register_sft_loss("kl_sft", reference=True)
def kl_sft(batch: SFTLogps, config) -> SFTLossOutput:
    """KL-SFT: `kl_coef` times a penalty toward the reference (the Penn experiment's; no paper to cite)."""
    penalty = KL_PENALTIES[config.kl_penalty](batch.policy_token_logps, batch.ref_token_logps, batch.mask)
    return SFTLossOutput(config.kl_coef * penalty, {
        "kl/penalty": penalty,
        "kl/nll": batch.nll,
        "logps/policy": losses.sequence_mean(batch.policy_token_logps, batch.mask),
        "logps/ref": losses.sequence_mean(batch.ref_token_logps, batch.mask),
    })

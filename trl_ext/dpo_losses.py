"""Pairwise preference losses by name: the extension point of `trl_ext.DPOTrainer`.

TRL 0.29 folded its DPO losses into one private method, so a custom loss could no longer be plugged in without
copying it. Here a loss is a function of the log-probabilities TRL already computes:

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
unknown names. A registration may also declare what the loss needs (per-token log-probs, a running state kept in
checkpoints), check its hyperparameters, and name its paper for the model card: see [`register_dpo_loss`].
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from . import citations
from .citations import Citation
from .losses import dpop_loss
from .registry import LossRegistry
from .trl_contract import TRL_DPO_LOSS_TYPES


@dataclass(frozen=True)
class PreferenceLogps:
    """Log-probabilities of one batch of `B` preference pairs.

    The per-sequence ones are summed over the completion tokens (TRL's convention) and are `(B,)`. The per-token ones
    are `(B, T)`, zero off the completion (`chosen_mask`, `rejected_mask`); the reference's are `None` when its
    log-probs are precomputed (TRL stores only their sums). `chosen_token_kl` / `rejected_token_kl` hold
    `KL(ref || pi)` of the next-token distributions over the vocabulary at each completion position, filled only for
    losses registered with `vocabulary_kl=True`. The policy's tensors carry gradient, the reference's not.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # completion tokens of each chosen completion (float)
    rejected_lengths: torch.Tensor
    chosen_token_logps: torch.Tensor | None = None
    rejected_token_logps: torch.Tensor | None = None
    ref_chosen_token_logps: torch.Tensor | None = None
    ref_rejected_token_logps: torch.Tensor | None = None
    chosen_mask: torch.Tensor | None = None  # (B, T) 1 on completion tokens
    rejected_mask: torch.Tensor | None = None
    chosen_token_kl: torch.Tensor | None = None
    rejected_token_kl: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def margins(self) -> torch.Tensor:
        """`(B,)` chosen minus rejected log-ratio: `beta` times it is DPO's logit."""
        return self.chosen_logratios - self.rejected_logratios

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


@dataclass
class LossContext:
    """What the trainer hands a loss registered with `stateful=True`, as its third argument.

    `state` is the loss's own dictionary of tensors: kept across steps, saved with every checkpoint and restored by
    `resume_from_checkpoint`. `training` is False in evaluation (leave the state alone there). `gather` concatenates a
    tensor over the processes (`accelerator.gather`), so that every process updates the state alike.
    """

    state: dict[str, torch.Tensor]
    training: bool
    gather: Callable[[torch.Tensor], torch.Tensor]


PreferenceLossFn = Callable[..., "torch.Tensor | PreferenceLossOutput"]


@dataclass(frozen=True)
class RegisteredLoss:
    """A loss function and what its registration declared."""

    fn: PreferenceLossFn
    citation: Citation | None = None
    token_logps: bool = False
    stateful: bool = False
    validate: Callable[["DPOConfig"], None] | None = None  # noqa: F821
    vocabulary_kl: bool = False
    rejected_only: bool = False


_REGISTRY = LossRegistry("DPO", TRL_DPO_LOSS_TYPES)


def register_dpo_loss(
    name: str, *, citation: Citation | None = None, token_logps: bool = False, stateful: bool = False,
    validate: Callable | None = None, vocabulary_kl: bool = False, rejected_only: bool = False,
) -> Callable[[PreferenceLossFn], PreferenceLossFn]:
    """Decorator that makes `name` a valid `DPOConfig.loss_type` computed by the decorated function.

    The function receives a [`PreferenceLogps`] and the trainer's `DPOConfig` (subclass it to add hyperparameters)
    and returns `(B,)` per-pair losses or a [`PreferenceLossOutput`]. Names of TRL's own losses cannot be taken.
    Registering a name again replaces the earlier function with a warning (re-running a notebook cell).

    Args:
        citation: the loss's paper ([`Citation`]): the model card the trainer writes cites it and tags the model with
            `name`.
        token_logps: the loss reads the reference's per-token log-probs (`ref_chosen_token_logps`, ...), so
            `precompute_ref_log_probs=True`, which keeps only their sums, is refused with it. The policy's
            per-token log-probs and the masks are always filled.
        stateful: the function takes a third argument, a [`LossContext`] whose `state` survives steps and
            checkpoints (e.g. running statistics).
        validate: called with the config when it is created; raise a `ValueError` naming the field and the fix.
        vocabulary_kl: the loss reads `chosen_token_kl` / `rejected_token_kl`, the per-position KL over the
            vocabulary, which the trainer computes from both models' last hidden states, a chunk of positions at a
            time (an extra LM-head pass for each model); implies `token_logps`.
        rejected_only: the loss reads only the rejected completions, so it also trains on datasets without `chosen`
            (the trainer then fills in an empty placeholder and logs no metric of the chosen completions).
    """
    return _REGISTRY.decorator(name, lambda fn: RegisteredLoss(fn, citation, token_logps or vocabulary_kl, stateful,
                                                               validate, vocabulary_kl, rejected_only))


def registered_dpo_losses() -> tuple[str, ...]:
    """Names of the losses registered with [`register_dpo_loss`] (trl_ext's own and the user's)."""
    return _REGISTRY.names()


def registered_dpo_loss(name: str) -> RegisteredLoss:
    """What `name` was registered with."""
    return _REGISTRY[name]


def compute_registered_loss(
    name: str, batch: PreferenceLogps, config, context: LossContext | None = None
) -> PreferenceLossOutput:
    """Runs the loss registered as `name` and normalizes its result to a [`PreferenceLossOutput`]."""
    registered = _REGISTRY[name]
    result = registered.fn(batch, config, context) if registered.stateful else registered.fn(batch, config)
    return result if isinstance(result, PreferenceLossOutput) else PreferenceLossOutput(result)


def check_finite_at_least(config, name: str, minimum: float = 0.0) -> None:
    """Raises a `ValueError` naming `config.<name>` unless it is a finite number >= `minimum`."""
    value = getattr(config, name)
    if not value >= minimum or value == float("inf"):  # `not >=` also catches NaN
        raise ValueError(f"`{name}` must be a finite number >= {minimum:g}, got {value}.")


def _dpop_output(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    losses, penalty = dpop_loss(batch.chosen_logratios, batch.rejected_logratios, config.beta, config.dpop_lambda)
    active = (batch.chosen_logratios < 0).float()
    return PreferenceLossOutput(losses, {"penalty": penalty.detach(), "active": active})


def _check_dpop_lambda(config) -> None:
    check_finite_at_least(config, "dpop_lambda")


@register_dpo_loss("dpop", citation=citations.DPOP, validate=_check_dpop_lambda)
def dpop(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """DPOP on summed log-probabilities, as in the paper."""
    return _dpop_output(batch, config)


@register_dpo_loss("dpop_norm", citation=citations.DPOP, validate=_check_dpop_lambda)
def dpop_norm(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """DPOP on per-token averaged log-probabilities (the length-normalised variant, cf. TRL's `sigmoid_norm`)."""
    return _dpop_output(batch.length_normalized(), config)

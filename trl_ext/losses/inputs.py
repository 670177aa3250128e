"""What a registered loss receives and returns: the log-probabilities of one batch, and per-example losses with
metrics. Shapes: `B` preference pairs, `S` sequences (a packed row counts as its sequences), `T` positions."""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch


def sequence_mean(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of `token_values` `(B, T)` over the positions where `mask` `(B, T)` is 1; `(B,)`."""
    mask = mask.to(token_values.dtype)
    return (token_values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


@dataclass
class LossContext:
    """The running state of a loss registered with `stateful=True`, handed to it as `batch.context`.

    `state` is the loss's own dictionary of tensors: kept across steps, saved with every checkpoint and restored by
    `resume_from_checkpoint`. `training` is False in evaluation (leave the state alone there). `gather` concatenates a
    tensor over the processes (`accelerator.gather`), so that every process updates the state alike;
    `process_index` is this process's place in that concatenation (every process holds as many pairs).
    """

    state: dict[str, torch.Tensor]
    training: bool
    gather: Callable[[torch.Tensor], torch.Tensor]
    process_index: int = 0


@dataclass(frozen=True)
class PreferenceLogps:
    """Log-probabilities of one batch of `B` preference pairs.

    The per-sequence ones are summed over the completion tokens (TRL's convention) and are `(B,)`. The per-token ones
    are `(B, T)`, zero off the completion (`chosen_mask`, `rejected_mask`); the reference's are `None` when its
    log-probs are precomputed (TRL stores only their sums). `chosen_token_kl` / `rejected_token_kl` hold
    `KL(ref || pi)` of the next-token distributions over the vocabulary at each completion position, filled only for
    losses registered with `vocabulary_kl=True`; `context` only for losses registered with `stateful=True`. The
    policy's tensors carry gradient, the reference's not.
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
    context: LossContext | None = None

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


@dataclass(frozen=True)
class SFTLogps:
    """One SFT batch as `S` per-sequence rows (a packed row is split into its sequences), `(S, T)` each.

    `policy_token_logps` carries gradient; `mask` is 1 on the target tokens; `nll` is TRL's loss term, detached: the
    mean NLL per target token over the batch of every process. Filled only when the loss's registration asks:
    `ref_token_logps`, the frozen reference's (`reference=True`); `teacher_forced_token_nll`, IFT's first pass's NLL
    of each target token on the ground-truth inputs, with its own `teacher_forced_mask` (`ift_inputs=True`, which
    also makes `policy_token_logps` those of the mixed inputs).
    """

    policy_token_logps: torch.Tensor
    ref_token_logps: torch.Tensor | None
    mask: torch.Tensor
    nll: torch.Tensor
    teacher_forced_token_nll: torch.Tensor | None = None
    teacher_forced_mask: torch.Tensor | None = None


@dataclass
class SFTLossOutput:
    """Per-sequence values `(S,)` of a registered SFT loss, and metrics `{key: tensor}` logged under `key` as given."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

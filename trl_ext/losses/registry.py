"""Losses by name: `register_dpo_loss` and `register_sft_loss`, the extension points of trl_ext's trainers.

A registered loss is a function `fn(batch, config)` of one batch's log-probabilities ([`PreferenceLogps`] or
[`SFTLogps`]) and the trainer's config, returning per-example losses or a `*LossOutput` with metrics. What a loss
needs beyond the log-probs TRL's forward gives (a running state, the vocabulary KL, a reference model, IFT's mixed
inputs) its registration declares, and the trainer fills the matching fields of the batch: the signature stays.

```python
import torch.nn.functional as F
from trl_ext import DPOConfig, PreferenceLogps, register_dpo_loss


@register_dpo_loss("my_margin")
def my_margin_loss(batch: PreferenceLogps, config: DPOConfig):
    margin = batch.chosen_logratios - batch.rejected_logratios
    return -F.logsigmoid(config.beta * margin - 1.0)  # (B,) per-pair losses


DPOConfig(loss_type=["sigmoid", "my_margin"], loss_weights=[1.0, 0.5])
```

Register before building the config, which rejects unknown names. Names of TRL's own losses cannot be taken;
registering a name again replaces the earlier function with a warning (re-running a notebook cell).
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from ..citations import Citation
from ..trl_contract import TRL_DPO_LOSS_TYPES, TRL_SFT_LOSS_TYPES
from .inputs import PreferenceLogps, PreferenceLossOutput, SFTLogps, SFTLossOutput


class LossRegistry:
    """Registrations (objects with the loss function as `fn`) by name; TRL's own names are reserved."""

    def __init__(self, kind: str, reserved: tuple[str, ...]):
        self.kind, self.reserved, self.entries = kind, reserved, {}

    def decorator(self, name: str, make_entry: Callable) -> Callable[[Callable], Callable]:
        """A decorator that registers `make_entry(fn)` as `name` and returns `fn`; replacing another function warns."""
        if name in self.reserved:
            raise ValueError(f"`{name}` is one of TRL's own {self.kind} loss types and cannot be registered again.")

        def register(fn: Callable) -> Callable:
            previous = self.entries.get(name)
            if previous is not None and previous.fn is not fn:
                warnings.warn(f"Replacing the {self.kind} loss `{name}` ({previous.fn.__qualname__}) with "
                              f"{fn.__qualname__}.", stacklevel=2)
            self.entries[name] = make_entry(fn)
            return fn

        return register

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def __getitem__(self, name: str):
        return self.entries[name]


@dataclass(frozen=True)
class RegisteredDPOLoss:
    """A pairwise loss function and what its registration declared (see [`register_dpo_loss`])."""

    fn: Callable[[PreferenceLogps, object], "torch.Tensor | PreferenceLossOutput"]  # noqa: F821
    citation: Citation | None = None
    token_logps: bool = False
    stateful: bool = False
    validate: Callable[[object], None] | None = None
    vocabulary_kl: bool = False
    rejected_only: bool = False


@dataclass(frozen=True)
class RegisteredSFTLoss:
    """An SFT loss function and what its registration declared (see [`register_sft_loss`])."""

    fn: Callable[[SFTLogps, object], "torch.Tensor | SFTLossOutput"]  # noqa: F821
    citation: Citation | None = None
    reference: bool = False
    ift_inputs: bool = False
    replaces_nll: bool = False


_DPO_LOSSES = LossRegistry("DPO", TRL_DPO_LOSS_TYPES)
_SFT_LOSSES = LossRegistry("SFT", TRL_SFT_LOSS_TYPES)


def register_dpo_loss(
    name: str, *, citation: Citation | None = None, token_logps: bool = False, stateful: bool = False,
    validate: Callable | None = None, vocabulary_kl: bool = False, rejected_only: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator that makes `name` a valid `DPOConfig.loss_type` computed by the decorated `fn(batch, config)`.

    `fn` receives a [`PreferenceLogps`] and the trainer's `DPOConfig` (subclass it to add hyperparameters) and returns
    `(B,)` per-pair losses or a [`PreferenceLossOutput`]; the trainer averages the losses, weights them by
    `loss_weights`, and logs each metric `key` as `"{name}/{key}"` (averaged over pairs and processes).

    Args:
        citation: the loss's paper ([`Citation`]): the model card the trainer writes cites it and tags the model with
            `name`.
        token_logps: the loss reads the reference's per-token log-probs (`ref_chosen_token_logps`, ...), so
            `precompute_ref_log_probs=True`, which keeps only their sums, is refused with it. The policy's
            per-token log-probs and the masks are always filled.
        stateful: `batch.context` is a [`LossContext`] whose `state` survives steps and checkpoints (e.g. running
            statistics).
        validate: called with the config when it is created; raise a `ValueError` naming the field and the fix.
        vocabulary_kl: the loss reads `chosen_token_kl` / `rejected_token_kl`, the per-position KL over the
            vocabulary, which the trainer computes from both models' last hidden states, a chunk of positions at a
            time (an extra LM-head pass for each model); implies `token_logps`.
        rejected_only: the loss reads only the rejected completions, so it also trains on datasets without `chosen`
            (the trainer then fills in an empty placeholder and logs no metric of the chosen completions).
    """
    return _DPO_LOSSES.decorator(name, lambda fn: RegisteredDPOLoss(
        fn, citation, token_logps or vocabulary_kl, stateful, validate, vocabulary_kl, rejected_only))


def register_sft_loss(
    name: str, *, citation: Citation | None = None, reference: bool = False, ift_inputs: bool = False,
    replaces_nll: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator that makes `name` a valid `SFTConfig.loss_type` computed by the decorated `fn(batch, config)`.

    `fn` receives an [`SFTLogps`] and the trainer's `SFTConfig` and returns `(S,)` per-sequence values or an
    [`SFTLossOutput`]. The trainer adds their mean (over every process's sequences, with TRL's
    `average_tokens_across_devices`) to TRL's NLL, and logs each metric under its key, averaged over sequences and
    processes.

    Args:
        citation: the loss's paper: the model card cites it and tags the model with `name`.
        reference: the loss reads a frozen reference model's per-token log-probs (`ref_token_logps`). The trainer
            then holds one: `ref_model`, the PEFT model with its adapter disabled, a frozen copy of a starting
            adapter, or a frozen copy of the model; or `precompute_ref_log_probs=True` computes them once before
            training. Other losses refuse `precompute_ref_log_probs`.
        ift_inputs: the loss learns from IFT's mixed inputs: before TRL's forward the trainer runs IFT's prediction
            pass (`SFTConfig.ift_*` fields) and feeds TRL's forward the mixed embeddings; `teacher_forced_token_nll`
            is filled. The trainer then refuses FSDP and DeepSpeed ZeRO-3, whose sharded parameters that pass cannot
            read.
        replaces_nll: the mean of the loss is the whole loss, instead of being added to TRL's NLL.
    """
    return _SFT_LOSSES.decorator(name, lambda fn: RegisteredSFTLoss(fn, citation, reference, ift_inputs,
                                                                    replaces_nll))


def registered_dpo_losses() -> tuple[str, ...]:
    """Names of the losses registered with [`register_dpo_loss`] (trl_ext's own and the user's)."""
    return _DPO_LOSSES.names()


def registered_dpo_loss(name: str) -> RegisteredDPOLoss:
    """What `name` was registered with."""
    return _DPO_LOSSES[name]


def registered_sft_losses() -> tuple[str, ...]:
    """Names of the losses registered with [`register_sft_loss`] (trl_ext's own and the user's)."""
    return _SFT_LOSSES.names()


def registered_sft_loss(name: str) -> RegisteredSFTLoss:
    """What `name` was registered with."""
    return _SFT_LOSSES[name]


def compute_dpo_loss(name: str, batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """Runs the DPO loss registered as `name`, its result as a [`PreferenceLossOutput`]."""
    result = _DPO_LOSSES[name].fn(batch, config)
    return result if isinstance(result, PreferenceLossOutput) else PreferenceLossOutput(result)


def compute_sft_loss(name: str, batch: SFTLogps, config) -> SFTLossOutput:
    """Runs the SFT loss registered as `name`, its result as an [`SFTLossOutput`]."""
    result = _SFT_LOSSES[name].fn(batch, config)
    return result if isinstance(result, SFTLossOutput) else SFTLossOutput(result)


def check_finite_at_least(config, name: str, minimum: float = 0.0) -> None:
    """For a registration's `validate`: raises a `ValueError` naming `config.<name>` unless it is a finite number >=
    `minimum`."""
    value = getattr(config, name)
    if not value >= minimum or value == float("inf"):  # `not >=` also catches NaN
        raise ValueError(f"`{name}` must be a finite number >= {minimum:g}, got {value}.")

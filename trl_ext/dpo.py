"""Drop-in `DPOConfig` / `DPOTrainer` that add the losses registered in `trl_ext.dpo_losses` to TRL's."""

import math
from dataclasses import dataclass, field

import torch
import trl
from datasets import Dataset, IterableDataset

from .data import warn_if_words_glue
from .dpo_losses import PreferenceLogps, compute_registered_loss, registered_dpo_losses
from .embedded import resolve_model_and_args
from .trl_contract import (
    TRL_DPO_LOSS_TYPES,
    ExpectedForward,
    FusedCausalLMOutput,
    check_recorded_forwards,
    default_bf16_to_what_the_machine_supports,
    record_fused_outputs,
)


@dataclass
class DPOConfig(trl.DPOConfig):
    r"""
    [`trl.DPOConfig`] with trl_ext's extra loss types.

    `loss_type` takes TRL's values plus every name registered with [`register_dpo_loss`]: trl_ext ships `"dpop"`
    (DPO-Positive on summed log-probs) and `"dpop_norm"` (the same on per-token averaged log-probs). They combine
    with TRL's through the `loss_type` list and `loss_weights`, e.g. `loss_type=["dpop", "sft"]`.

    Parameters:
        dpop_lambda (`float`, *optional*, defaults to `50.0`):
            Weight of DPOP's penalty `max(0, -(log pi(y_w) - log ref(y_w)))`, applied inside the sigmoid and scaled by
            `beta`. Must be >= 0; `0` is exactly DPO. The paper uses 50 (with `beta=0.3`) and reports little
            sensitivity in [5, 500]. Used by `"dpop"` and `"dpop_norm"`.
    """

    dpop_lambda: float = field(
        default=50.0,
        metadata={"help": "Weight of the DPOP penalty (>= 0; 0 is exactly DPO). Used by `dpop` and `dpop_norm`."},
    )

    def __post_init__(self):
        default_bf16_to_what_the_machine_supports(self)
        super().__post_init__()
        validate_loss_config(self)


def validate_loss_config(args: trl.DPOConfig) -> None:
    """Raises a `ValueError` naming the field if `args` asks for a loss trl_ext cannot compute as configured."""
    valid = TRL_DPO_LOSS_TYPES + registered_dpo_losses()
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if not loss_types:
        raise ValueError("`loss_type` is empty: name at least one loss, e.g. `loss_type=['sigmoid']`.")
    weights = {"beta": args.beta, **{f"loss_weights[{i}]": w for i, w in enumerate(args.loss_weights or [])}}
    for name, value in weights.items():
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value}.")
    unknown = [name for name in loss_types if name not in valid]
    if unknown:
        raise ValueError(
            f"Unknown `loss_type` {unknown}. Valid values: TRL's {list(TRL_DPO_LOSS_TYPES)} and trl_ext's "
            f"{list(registered_dpo_losses())}. Custom losses must be registered with "
            "`trl_ext.register_dpo_loss` before the config is created."
        )
    extension = [name for name in loss_types if name in registered_dpo_losses()]
    if not extension:
        return
    if not isinstance(args, DPOConfig):
        raise TypeError(f"`loss_type` {extension} needs a `trl_ext.DPOConfig`, got a `{type(args).__qualname__}`.")
    if not args.dpop_lambda >= 0 or math.isinf(args.dpop_lambda):  # `not >=` also catches NaN
        raise ValueError(f"`dpop_lambda` must be a finite number >= 0, got {args.dpop_lambda}.")
    # These TRL options reshape the log-probs or the per-pair loss inside TRL's private loss code; trl_ext's losses
    # work on the plain summed log-probs, so refuse rather than silently ignore them.
    unsupported = {
        "ld_alpha": (args.ld_alpha, None),
        "f_divergence_type": (args.f_divergence_type, "reverse_kl"),
        "use_weighting": (args.use_weighting, False),
    }
    for name, (value, default) in unsupported.items():
        if value != default:
            raise ValueError(
                f"`{name}={value!r}` is not supported with the trl_ext loss types {extension}; "
                f"leave it at {default!r} or use only TRL's loss types."
            )


class DPOTrainer(trl.DPOTrainer):
    """
    [`trl.DPOTrainer`] that also computes the losses registered with [`register_dpo_loss`] (`"dpop"`,
    `"dpop_norm"`, and the user's). Same constructor, datasets, metrics and reference-model handling as TRL's.

    TRL computes its own loss types and every metric exactly as it would alone; trl_ext's losses are computed from the
    per-sequence log-probs of the same forward passes, added with their `loss_weights`, and log their extra
    metrics as `"{loss_type}/{key}"`. `model` may also be an embedded model name such as
    `"embedded:smollm2-135m-instruct"`.
    """

    _tag_names = ["trl", "trl-ext", "dpo"]

    def __init__(self, model, ref_model=None, args=None, *trainer_args, **trainer_kwargs):
        model, args = resolve_model_and_args(model, args, DPOConfig, "DPO")
        validate_loss_config(args)
        super().__init__(model, ref_model, args, *trainer_args, **trainer_kwargs)

        # TRL's loss loop only knows its own names: give it those and keep ours, in the user's order, for later.
        weighted = list(zip(self.loss_types, self.loss_weights, strict=True))
        self.loss_types = [name for name, _ in weighted if name in TRL_DPO_LOSS_TYPES]
        self.loss_weights = [weight for name, weight in weighted if name in TRL_DPO_LOSS_TYPES]
        self.extension_losses = [(name, weight) for name, weight in weighted if name not in TRL_DPO_LOSS_TYPES]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        _check_preference_columns(dataset, dataset_name)
        warn_if_words_glue(dataset, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.extension_losses:
            return super()._compute_loss(model, inputs, return_outputs)

        # TRL runs the policy first, then (unless reference log-probs are precomputed) the reference: `ref_model`,
        # or the policy itself with its adapter disabled.
        reference = [self.ref_model] if self.ref_model is not None else []
        policy_has_grad = torch.is_grad_enabled()
        with record_fused_outputs(self.accelerator, model, *reference) as fused_outputs:
            result = super()._compute_loss(model, inputs, return_outputs)
        loss, outputs = result if return_outputs else (result, None)

        self._check_forwards(inputs, fused_outputs, policy_has_grad)
        batch = self._preference_logps(inputs, fused_outputs)
        mode = "train" if self.model.training else "eval"
        for name, weight in self.extension_losses:
            output = compute_registered_loss(name, batch, self.args)
            loss = loss + output.losses.mean() * weight
            for key, value in output.metrics.items():
                gathered = self.accelerator.gather(value.detach().float())
                self._metrics[mode][f"{name}/{key}"].append(gathered.mean().item())
        return (loss, outputs) if return_outputs else loss

    def _check_forwards(self, inputs, fused_outputs: list[FusedCausalLMOutput], policy_has_grad: bool) -> None:
        """The contract: the policy on `[chosen; rejected]` rows, then the reference on the same rows, no gradient."""
        rows, positions = inputs["completion_mask"].size(0), inputs["completion_mask"].size(1) - 1
        expected = [ExpectedForward("policy", rows, positions, policy_has_grad)]
        if not self.precompute_ref_logps:
            expected.append(ExpectedForward("reference", rows, positions, requires_grad=False))
        check_recorded_forwards("trl.DPOTrainer._compute_loss", fused_outputs, expected)

    def _preference_logps(self, inputs, fused_outputs: list[FusedCausalLMOutput]) -> PreferenceLogps:
        completion_mask = inputs["completion_mask"][:, 1:]
        seq_len = completion_mask.size(1)

        def sequence_logps(output: FusedCausalLMOutput):
            # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real tokens, as TRL does.
            return output.log_probs[:, -seq_len:].sum(dim=1).chunk(2)

        chosen_logps, rejected_logps = sequence_logps(fused_outputs[0])
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = sequence_logps(fused_outputs[1])
        chosen_lengths, rejected_lengths = completion_mask.sum(dim=1).float().chunk(2)
        return PreferenceLogps(
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )


def _check_preference_columns(dataset, dataset_name: str) -> None:
    """Fails before training if `dataset` has neither `chosen`/`rejected` texts nor TRL's tokenized columns."""
    if not isinstance(dataset, Dataset | IterableDataset) or dataset.column_names is None:
        return  # streaming datasets with unknown columns are checked by TRL when the first batch is built
    columns = set(dataset.column_names)
    if {"chosen", "rejected"} <= columns or {"chosen_ids", "rejected_ids"} <= columns:
        return
    raise ValueError(
        f"The {dataset_name} dataset needs `chosen` and `rejected` columns (and optionally `prompt`), TRL's "
        f"preference format; it has {sorted(columns)}. Rename or map your columns, e.g. "
        "`dataset.rename_columns({'response_j': 'chosen', 'response_k': 'rejected'})`."
    )

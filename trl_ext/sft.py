"""Drop-in `SFTConfig` / `SFTTrainer` that add KL-SFT to TRL's `nll` and `dft` losses."""

import contextlib
from dataclasses import dataclass, field

import torch
import trl
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from trl.experimental.utils import create_reference_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, get_config_model_id, use_adapter

from . import losses
from ._fused import record_fused_outputs
from .embedded import resolve_model_name

TRL_SFT_LOSS_TYPES = ("nll", "dft")
SFT_LOSS_TYPES = TRL_SFT_LOSS_TYPES + ("kl_sft",)
KL_PENALTIES = {"sq_logratio": losses.sq_logratio_penalty, "token_kl": losses.token_kl_penalty}


@dataclass
class SFTConfig(trl.SFTConfig):
    r"""
    [`trl.SFTConfig`] with trl_ext's extra loss types.

    `loss_type` takes TRL's `"nll"` and `"dft"` plus `"kl_sft"`: the NLL of the target completion plus `kl_coef` times
    a penalty toward a frozen reference model. The reference is `ref_model` if given to the trainer, else the model
    with its PEFT adapter disabled, else a frozen copy of the initial model.

    Parameters:
        kl_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the KL-SFT penalty, >= 0; `0` gives exactly the `nll` loss.
        kl_penalty (`str`, *optional*, defaults to `"sq_logratio"`):
            `"sq_logratio"`: squared difference of the per-token averaged completion log-probs of policy and
            reference (the Penn experiment's; penalises drift both ways). `"token_kl"`: per-token reverse-KL
            estimate `k3 = exp(r) - r - 1`, `r = logp_ref - logp_policy`, on the target tokens.
    """

    kl_coef: float = field(default=0.1, metadata={"help": "Weight of the KL-SFT penalty (>= 0; 0 is exactly `nll`)."})
    kl_penalty: str = field(
        default="sq_logratio",
        metadata={"help": "KL-SFT penalty.", "choices": list(KL_PENALTIES)},
    )

    def __post_init__(self):
        super().__post_init__()
        validate_sft_config(self)


def validate_sft_config(args: trl.SFTConfig) -> None:
    """Raises a `ValueError` naming the field if `args` asks for something trl_ext cannot compute."""
    if args.loss_type not in SFT_LOSS_TYPES:
        raise ValueError(f"Unknown `loss_type` '{args.loss_type}'. Valid values: {list(SFT_LOSS_TYPES)}.")
    if args.loss_type in TRL_SFT_LOSS_TYPES:
        return
    if not isinstance(args, SFTConfig):
        raise TypeError(f"`loss_type='{args.loss_type}'` needs a `trl_ext.SFTConfig`, got `{type(args).__qualname__}`.")
    if args.kl_coef < 0:
        raise ValueError(f"`kl_coef` must be >= 0, got {args.kl_coef}.")
    if args.kl_penalty not in KL_PENALTIES:
        raise ValueError(f"Unknown `kl_penalty` '{args.kl_penalty}'. Valid values: {list(KL_PENALTIES)}.")
    if args.label_smoothing_factor > 0:
        raise ValueError(f"`label_smoothing_factor` is not supported with `loss_type='{args.loss_type}'`; set it to 0.")


@contextlib.contextmanager
def _as_trl_loss_type(args: trl.SFTConfig):
    """Shows TRL's constructor, which accepts only its own loss types, `nll` while it runs.

    trl_ext's losses start from TRL's NLL path, so `nll` is the truthful stand-in; the user's value is restored.
    """
    loss_type = args.loss_type
    if loss_type not in TRL_SFT_LOSS_TYPES:
        args.loss_type = "nll"
    try:
        yield
    finally:
        args.loss_type = loss_type


class SFTTrainer(trl.SFTTrainer):
    """
    [`trl.SFTTrainer`] with trl_ext's SFT losses. Same constructor as TRL's plus `ref_model` (used by `kl_sft`).

    `nll` and `dft` are TRL's, untouched. Datasets may also be in preference format (`prompt`, `chosen`, `rejected`):
    the trainer learns the `chosen` completion. `model` may be an embedded name such as
    `"embedded:smollm2-135m-instruct"`.
    """

    _tag_names = ["trl", "trl-ext", "sft"]

    def __init__(
        self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None, *trainer_args,
        ref_model=None, **trainer_kwargs,
    ):
        if isinstance(model, str):
            model = resolve_model_name(model)
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SFTConfig(f"{model_name.split('/')[-1]}-SFT")
        validate_sft_config(args)
        # Mapped before TRL sees them: TRL picks `completion_only_loss` from the raw columns.
        train_dataset = _chosen_as_completion(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: _chosen_as_completion(dataset) for name, dataset in eval_dataset.items()}
        else:
            eval_dataset = _chosen_as_completion(eval_dataset)
        with _as_trl_loss_type(args):
            super().__init__(model, args, data_collator, train_dataset, eval_dataset, *trainer_args, **trainer_kwargs)
        self.ref_model = self._build_reference(ref_model) if args.loss_type == "kl_sft" else None

    def _build_reference(self, ref_model):
        """The frozen reference of `kl_sft`: `ref_model`, else `None` for the adapter-disabled PEFT model, else a copy."""
        if ref_model is None and is_peft_model(self.model):
            return None
        if ref_model is None:
            ref_model = create_reference_model(self.model)  # a frozen copy, fused head included
        else:
            add_fused_lm_head(ref_model)
        ref_model.requires_grad_(False).eval()  # eval: no dropout in the reference
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.loss_type != "kl_sft":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        with record_fused_outputs(self.accelerator.unwrap_model(model)) as fused_outputs:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        policy_token_logps, mask = fused_outputs[0].log_probs, fused_outputs[0].label_mask
        ref_token_logps = self._reference_token_logps(inputs)
        penalty = KL_PENALTIES[self.args.kl_penalty](policy_token_logps, ref_token_logps, mask)
        # Like TRL's MoE aux loss: with `num_items_in_batch`, the Trainer leaves gradient accumulation to the loss,
        # so a per-micro-batch mean is averaged over the accumulation steps here.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + self.args.kl_coef * penalty.mean() / steps

        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            metrics = {
                "kl/penalty": penalty,
                "kl/nll": -losses.sequence_mean(policy_token_logps, mask),
                "logps/policy": losses.sequence_mean(policy_token_logps, mask),
                "logps/ref": losses.sequence_mean(ref_token_logps, mask),
            }
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather(value.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss

    def _reference_token_logps(self, inputs) -> torch.Tensor:
        """`(B, T - 1)` log-probability of each label under the reference, 0 where the label is ignored."""
        model_inputs = {**inputs, "use_cache": False, "fused_lm_head": True}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is not None:
                return self.ref_model(**model_inputs).log_probs
            unwrapped = self.accelerator.unwrap_model(self.model)
            # A new adapter disabled is the base model; an adapter loaded for re-training keeps a copy named "ref".
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return self.model(**model_inputs).log_probs


def _chosen_as_completion(dataset):
    """Maps a preference dataset (`prompt`, `chosen`, `rejected`) to prompt-completion format on `chosen`."""
    if not isinstance(dataset, Dataset | IterableDataset) or dataset.column_names is None:
        return dataset
    columns = set(dataset.column_names)
    if not {"chosen", "rejected"} <= columns or {"completion", "text", "messages"} & columns:
        return dataset
    if "prompt" not in columns:
        raise ValueError(
            "A preference dataset needs a `prompt` column to train on `chosen` as the completion; this one has "
            f"{sorted(columns)}."
        )
    return dataset.rename_column("chosen", "completion").remove_columns("rejected")

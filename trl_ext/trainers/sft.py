"""Drop-in `SFTConfig` / `SFTTrainer` that add the losses registered with `trl_ext.register_sft_loss` to TRL's `nll`
and `dft`.

This module holds the configuration, its validation and the loss dispatch; the losses live in `trl_ext.losses`, the
reference model in `reference.py`, IFT's first pass in `ift_inputs.py`.
"""

import contextlib
import inspect
import math
from dataclasses import dataclass, field

import torch
import trl
from datasets import Dataset, IterableDataset
from peft import PeftModel

from ..citations import Citation
from ..config_checks import check_training_fields
from ..data import warn_if_words_glue
from ..data_checks import check_completions_left, check_dataset_rows, check_datasets_rows
from ..embedded import resolve_model_and_args
from ..losses import SFTLogps, compute_sft_loss, registered_sft_loss, registered_sft_losses
from ..losses.kl_sft import KL_PENALTIES
from ..trl_contract import (
    TRL_SFT_LOSS_CHOICES,
    TRL_SFT_LOSS_TYPES,
    ExpectedForward,
    check_recorded_forwards,
    default_bf16_to_what_the_machine_supports,
    keep_4bit_layers_differentiable,
    keep_signature_column,
    loss_is_scaled_for_gradient_accumulation,
    record_fused_outputs,
)
from .ift_inputs import check_parameters_are_whole, ift_inputs
from .metrics import log_means
from .model_card import CitesItsLosses
from .packed import rows_per_sequence
from .reference import (
    build_reference,
    keep_starting_adapter_as_reference,
    precompute_reference_logps,
    reference_token_logps,
)
from .saving import SavesLoadableModels

IFT_PREDICTIONS = ("greedy", "soft")
IFT_LAMBDA_SCHEDULES = ("constant", "linear")


@dataclass
class SFTConfig(trl.SFTConfig):
    r"""
    [`trl.SFTConfig`] with trl_ext's extra loss types.

    `loss_type` takes TRL's `"nll"` and `"dft"` plus:
    - `"kl_sft"`: the NLL of the target completion plus `kl_coef` times a penalty toward a frozen reference model. The
      reference is `ref_model` if given to the trainer, else the model with its PEFT adapter disabled, else a frozen
      copy of the initial model.
    - `"ift"`: Intuitive Fine-Tuning (Hua et al. 2024): a no-grad pass predicts every completion token from its
      prefix, the prediction is mixed into the next input embedding (temporal residual connection, `ift_lambda`),
      and a second pass learns the ground truth from the mixed inputs, with per-token weights from relation
      propagation (`ift_gamma`). About 4/3 of SFT's compute; no reference model.

    `bf16` left unset defaults to what the machine supports (off on a CPU), so the same script runs anywhere.

    Parameters:
        kl_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the KL-SFT penalty, >= 0; `0` gives exactly the `nll` loss.
        kl_penalty (`str`, *optional*, defaults to `"sq_logratio"`):
            `"sq_logratio"`: squared difference of the per-token averaged completion log-probs of policy and
            reference (the Penn experiment's; penalises drift both ways). `"token_kl"`: per-token reverse-KL
            estimate `k3 = exp(r) - r - 1`, `r = logp_ref - logp_policy`, on the target tokens.
        precompute_ref_log_probs (`bool`, *optional*, defaults to `False`):
            For `kl_sft`: compute the reference's per-token log-probs of the train and eval datasets once, at
            construction, and drop the reference copy, so no reference model is held or run during training. Needs
            map-style datasets without packing or padding-free batches; only for `kl_sft`.
        ift_lambda (`float`, *optional*, defaults to `0.2`):
            Weight of the predicted embedding in IFT's mixed inputs, in [0, 1] (the target of the linear schedule).
        ift_gamma (`float`, *optional*, defaults to `0.95`):
            Discount of IFT's relation propagation, in [0, 1]; `0` weights every token 1.
        ift_prediction (`str`, *optional*, defaults to `"greedy"`):
            `"greedy"`: the embedding of the argmax token (the official code). `"soft"`: the probability-weighted
            average of the embedding rows (the paper's description); it costs a `(positions, vocab) @ (vocab, hidden)`
            product, computed in chunks of 256 positions in the model's dtype.
        ift_lambda_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"`, or `"linear"`: from `ift_lambda_min` to `ift_lambda` over `ift_lambda_warmup_steps`
            optimizer steps. Computed from the global step, so it is right after resuming from a checkpoint.
        ift_lambda_min (`float`, *optional*, defaults to `0.0`):
            Start of the linear schedule, in [0, `ift_lambda`].
        ift_lambda_warmup_steps (`int`, *optional*, defaults to `0`):
            Length of the linear schedule in optimizer steps (> 0 with `"linear"`, 0 with `"constant"`).
        ift_detach_weights (`bool`, *optional*, defaults to `False`):
            Whether to stop the gradient through the relation-propagation weights (the official code does not).
    """

    # TRL's field lists only its own names as argparse `choices`: without them, `--loss_type kl_sft` and the names
    # users register parse, and `validate_sft_config` names the valid ones.
    loss_type: str = field(
        default="nll",
        metadata={"help": f"Loss type: TRL's {', '.join(TRL_SFT_LOSS_TYPES)}; trl_ext's "
                          f"{', '.join(registered_sft_losses())}; or a loss registered with "
                          "`trl_ext.register_sft_loss`."},
    )
    kl_coef: float = field(default=0.1, metadata={"help": "Weight of the KL-SFT penalty (>= 0; 0 is exactly `nll`)."})
    kl_penalty: str = field(
        default="sq_logratio",
        metadata={"help": "KL-SFT penalty.", "choices": list(KL_PENALTIES)},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the KL-SFT reference's log-probs once before training; no reference runs after."},
    )

    ift_lambda: float = field(default=0.2, metadata={"help": "IFT mixing weight of the prediction, in [0, 1]."})
    ift_gamma: float = field(default=0.95, metadata={"help": "IFT relation-propagation discount, in [0, 1]."})
    ift_prediction: str = field(
        default="greedy", metadata={"help": "IFT prediction embedding.", "choices": list(IFT_PREDICTIONS)}
    )
    ift_lambda_schedule: str = field(
        default="constant", metadata={"help": "IFT lambda schedule.", "choices": list(IFT_LAMBDA_SCHEDULES)}
    )
    ift_lambda_min: float = field(default=0.0, metadata={"help": "Start of IFT's linear lambda schedule."})
    ift_lambda_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of IFT's lambda ramp."})
    ift_detach_weights: bool = field(default=False, metadata={"help": "Detach IFT's relation-propagation weights."})

    def __post_init__(self):
        _check_loss_type_name(self.loss_type, TRL_SFT_LOSS_CHOICES)  # before TRL's checks of other fields
        default_bf16_to_what_the_machine_supports(self)
        super().__post_init__()
        validate_sft_config(self)


def _check_loss_type_name(loss_type: str, trl_names: tuple[str, ...] = TRL_SFT_LOSS_TYPES) -> None:
    if loss_type not in trl_names + registered_sft_losses():
        raise ValueError(
            f"Unknown `loss_type` '{loss_type}'. Valid values: TRL's {list(TRL_SFT_LOSS_TYPES)} and trl_ext's "
            f"{list(registered_sft_losses())}. Custom losses must be registered with `trl_ext.register_sft_loss` "
            "before the config is created."
        )


def validate_sft_config(args: trl.SFTConfig) -> None:
    """Raises a `ValueError` naming the field and the fix if `args` asks for something trl_ext cannot honour."""
    _check_loss_type_name(args.loss_type)
    check_training_fields(args)
    uses_reference = args.loss_type in registered_sft_losses() and registered_sft_loss(args.loss_type).reference
    if getattr(args, "precompute_ref_log_probs", False) and not uses_reference:
        raise ValueError(
            f"`precompute_ref_log_probs=True` is for `loss_type='kl_sft'`; `{args.loss_type}` has no reference model "
            "(only losses registered with `reference=True` have one), so it would run a reference pass over the whole "
            "dataset for nothing. Set it to False."
        )
    if args.loss_type in TRL_SFT_LOSS_TYPES:
        return
    if not isinstance(args, SFTConfig):
        raise TypeError(f"`loss_type='{args.loss_type}'` needs a `trl_ext.SFTConfig`, got `{type(args).__qualname__}`.")
    if not args.kl_coef >= 0 or math.isinf(args.kl_coef):  # `not >=` also catches NaN
        raise ValueError(f"`kl_coef` must be a finite number >= 0, got {args.kl_coef}.")
    if args.kl_penalty not in KL_PENALTIES:
        raise ValueError(f"Unknown `kl_penalty` '{args.kl_penalty}'. Valid values: {list(KL_PENALTIES)}.")
    for name in ("ift_lambda", "ift_gamma", "ift_lambda_min"):
        if not 0 <= getattr(args, name) <= 1:  # also refuses NaN
            raise ValueError(f"`{name}` must be in [0, 1], got {getattr(args, name)}.")
    if args.ift_prediction not in IFT_PREDICTIONS:
        raise ValueError(f"Unknown `ift_prediction` '{args.ift_prediction}'. Valid values: {list(IFT_PREDICTIONS)}.")
    if args.ift_lambda_schedule not in IFT_LAMBDA_SCHEDULES:
        raise ValueError(
            f"Unknown `ift_lambda_schedule` '{args.ift_lambda_schedule}'. Valid values: {list(IFT_LAMBDA_SCHEDULES)}."
        )
    if args.ift_lambda_min > args.ift_lambda:
        raise ValueError(f"`ift_lambda_min` ({args.ift_lambda_min}) must be <= `ift_lambda` ({args.ift_lambda}).")
    if args.ift_lambda_schedule == "linear" and args.ift_lambda_warmup_steps <= 0:
        raise ValueError(
            f"`ift_lambda_schedule='linear'` ramps over `ift_lambda_warmup_steps` steps, got "
            f"{args.ift_lambda_warmup_steps}: set it > 0, or use `ift_lambda_schedule='constant'`."
        )
    if args.ift_lambda_schedule == "constant" and args.ift_lambda_warmup_steps != 0:
        raise ValueError(
            f"`ift_lambda_warmup_steps={args.ift_lambda_warmup_steps}` has no effect with "
            "`ift_lambda_schedule='constant'`: set `ift_lambda_schedule='linear'` to ramp lambda, or leave it at 0."
        )
    if args.precompute_ref_log_probs and (args.packing or args.padding_free):
        raise ValueError(
            "`precompute_ref_log_probs=True` does not support `packing` or `padding_free`: set them to False, or "
            "compute the reference on the fly (`precompute_ref_log_probs=False`)."
        )
    if args.label_smoothing_factor > 0:
        raise ValueError(
            f"`label_smoothing_factor={args.label_smoothing_factor}` is not supported with "
            f"`loss_type='{args.loss_type}'`: TRL would then compute the loss itself and run the forward trl_ext "
            "reads without gradient. Set it to 0."
        )
    if args.neftune_noise_alpha is not None:
        raise ValueError(
            f"`neftune_noise_alpha` is not supported with `loss_type='{args.loss_type}'`: its noise would enter "
            + ("the policy's log-probs but not the reference's, so a penalty toward the reference would measure noise"
               if registered_sft_loss(args.loss_type).reference else f"the passes `{args.loss_type}` runs")
            + ". Leave it at None."
        )


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


class SFTTrainer(SavesLoadableModels, CitesItsLosses, trl.SFTTrainer):
    """
    [`trl.SFTTrainer`] with the SFT losses registered with [`register_sft_loss`] (`kl_sft`, `ift` and the user's).
    Same constructor as TRL's plus `ref_model` (used by losses with a reference, such as `kl_sft`).

    `nll` and `dft` are TRL's, untouched. Datasets may also be in preference format (`prompt`, `chosen`, `rejected`):
    the trainer learns the `chosen` completion. `model` may be an embedded name such as
    `"embedded:smollm2-135m-instruct"`. KL-SFT's reference is the model as training starts (see
    `trl_ext.sft_reference`): with a PEFT model whose adapter is already trained, a frozen copy of that adapter.
    """

    _tag_names = ["trl", "trl-ext", "sft"]

    def __init__(
        self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None, *trainer_args,
        ref_model=None, **trainer_kwargs,
    ):
        model, args = resolve_model_and_args(model, args, SFTConfig, "SFT")
        validate_sft_config(args)
        trl_arguments = inspect.signature(trl.SFTTrainer.__init__).bind(
            self, model, args, data_collator, train_dataset, eval_dataset, *trainer_args, **trainer_kwargs
        ).arguments
        registered = registered_sft_loss(args.loss_type) if args.loss_type in registered_sft_losses() else None
        if registered is not None and trl_arguments.get("compute_loss_func") is not None:
            raise ValueError(
                f"`compute_loss_func` cannot be combined with `loss_type='{args.loss_type}'`: TRL would compute the "
                "loss with it and run the forward trl_ext reads without gradient. Drop `compute_loss_func`, or "
                "subclass `trl_ext.SFTTrainer` and override `compute_loss`."
            )
        starts_from_trained_adapter = isinstance(model, PeftModel) and trl_arguments.get("peft_config") is None
        uses_reference = registered is not None and registered.reference
        if uses_reference and ref_model is None and starts_from_trained_adapter:
            keep_starting_adapter_as_reference(model)
        check_datasets_rows(train_dataset, eval_dataset)  # before the model loads
        # Mapped before TRL sees them: TRL picks `completion_only_loss` from the raw columns.
        train_dataset = _chosen_as_completion(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: _chosen_as_completion(dataset, name) for name, dataset in eval_dataset.items()}
        else:
            eval_dataset = _chosen_as_completion(eval_dataset, "eval")
        with _as_trl_loss_type(args):
            super().__init__(model, args, data_collator, train_dataset, eval_dataset, *trainer_args, **trainer_kwargs)
        keep_4bit_layers_differentiable(self.model)
        if registered is not None and registered.ift_inputs:
            check_parameters_are_whole(self, args.loss_type)
        self.ref_model = build_reference(self, ref_model) if uses_reference else None
        if args.precompute_ref_log_probs:
            precompute_reference_logps(self)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # Also reached by `evaluate(dataset)`, after construction
        check_dataset_rows(dataset, dataset_name)
        dataset = _chosen_as_completion(dataset, dataset_name)
        warn_if_words_glue(dataset, dataset_name)
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
        check_completions_left(dataset, dataset if packing else prepared, dataset_name,
                               ("completion", args.dataset_text_field, "messages"), args.max_length, tokenizer.eos_token)
        return prepared

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.precompute_ref_log_probs:
            keep_signature_column(self, "ref_token_logps")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.loss_type in TRL_SFT_LOSS_TYPES:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.registered_loss(model, inputs, return_outputs, num_items_in_batch)

    def registered_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The loss registered as `loss_type`, computed from the log-probs of TRL's forward (on IFT's mixed inputs if
        it asks for them): its batch mean added to TRL's NLL, or in its place."""
        name = self.args.loss_type
        registered = registered_sft_loss(name)
        inputs = dict(inputs)
        precomputed = inputs.pop("ref_token_logps", None)
        ift = None
        if registered.ift_inputs:
            ift = ift_inputs(self.model, self.accelerator.unwrap_model(model), inputs, self.args, self.state.global_step)
        result, fused_output = self.trl_compute_loss(model, ift.mixed_inputs if ift else inputs, return_outputs,
                                                     num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        policy_token_logps, mask = fused_output.log_probs, fused_output.label_mask
        ref_token_logps = None
        if registered.reference:
            ref_token_logps = precomputed if precomputed is not None else reference_token_logps(self, inputs)
        # The NLL term as TRL reduces it: a mean over every target token of the batch, on all processes
        nll_sum = self.accelerator.gather(-(policy_token_logps.detach() * mask).sum()).sum()
        num_tokens = self.accelerator.gather(mask.sum()).sum().clamp(min=1)
        rows = rows_per_sequence(inputs, mask, policy_token_logps,
                                 *([ref_token_logps] if ref_token_logps is not None else []))
        batch = SFTLogps(policy_token_logps=rows[1], ref_token_logps=rows[2] if len(rows) > 2 else None, mask=rows[0],
                         nll=nll_sum / num_tokens,
                         teacher_forced_token_nll=ift.teacher_forced_token_nll if ift else None,
                         teacher_forced_mask=ift.teacher_forced_mask if ift else None)
        output = compute_sft_loss(name, batch, self.args)
        registered_mean = self.batch_mean(output.losses) / self.accumulation_divisor(num_items_in_batch)
        loss = registered_mean if registered.replaces_nll else loss + registered_mean
        metrics = dict(output.metrics)
        if ift:
            metrics["ift/lambda"] = torch.tensor([ift.ift_lambda], device=mask.device)
        log_means(self, metrics)
        return (loss, outputs) if return_outputs else loss

    def loss_papers(self) -> list[Citation]:
        """The paper of the registered loss in `loss_type`, if it has one (TRL cites none for its SFT losses)."""
        if self.args.loss_type in TRL_SFT_LOSS_TYPES or registered_sft_loss(self.args.loss_type).citation is None:
            return []
        return [registered_sft_loss(self.args.loss_type).citation]

    def trl_compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """TRL's `compute_loss` on `inputs` (token ids or IFT's mixed embeddings), and the fused output of the policy forward it
        runs, checked against the contract: one forward over the batch's rows, with gradient when it is enabled."""
        has_grad = torch.is_grad_enabled()
        with record_fused_outputs(self.accelerator, model) as fused_outputs:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        rows, positions = inputs["labels"].shape
        check_recorded_forwards("trl.SFTTrainer.compute_loss", fused_outputs,
                                [ExpectedForward("policy", rows, positions - 1, has_grad)])
        return result, fused_outputs[0]

    def accumulation_divisor(self, num_items_in_batch) -> int:
        """What a per-micro-batch mean is divided by: the accumulation steps when the Trainer leaves gradient
        accumulation to the loss (as TRL does for its MoE aux loss), else 1."""
        if loss_is_scaled_for_gradient_accumulation(self, num_items_in_batch):
            return self.current_gradient_accumulation_steps
        return 1

    def batch_mean(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """The mean of `per_sequence` `(S,)` over this batch, or, with `average_tokens_across_devices`, over the
        sequences of every process: scaled so that DDP's average of the gradients is the global mean even when the
        processes hold different numbers of sequences (packed rows)."""
        processes = self.accelerator.num_processes
        if not self.args.average_tokens_across_devices or processes == 1:
            return per_sequence.mean()
        count = torch.tensor(per_sequence.numel(), device=per_sequence.device)
        return per_sequence.sum() * processes / self.accelerator.gather(count).sum().clamp(min=1)


def _chosen_as_completion(dataset, dataset_name: str):
    """Maps a preference dataset (`prompt`, `chosen`, `rejected`) to prompt-completion format on `chosen`."""
    if not isinstance(dataset, Dataset | IterableDataset) or dataset.column_names is None:
        return dataset
    columns = set(dataset.column_names)
    if {"completion", "text", "messages"} & columns:
        return dataset
    if "chosen" in columns and "rejected" not in columns:
        raise ValueError(
            f"The {dataset_name} dataset has `chosen` but no `rejected` column ({sorted(columns)}): rename `chosen` to "
            "`completion` for SFT (`dataset.rename_column('chosen', 'completion')`), or add `rejected` to use it as "
            "a preference dataset."
        )
    if "chosen" not in columns:
        return dataset
    if "prompt" not in columns:
        raise ValueError(
            f"The {dataset_name} dataset is a preference dataset without a `prompt` column ({sorted(columns)}); "
            "SFT on `chosen` needs `prompt`, `chosen` and `rejected` columns."
        )
    return dataset.rename_column("chosen", "completion").remove_columns("rejected")

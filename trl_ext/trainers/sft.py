"""`SFTTrainer`: `trl.SFTTrainer` that adds the losses registered with `trl_ext.register_sft_loss` to TRL's `nll` and
`dft`: the loss dispatch and the datasets; the losses live in `trl_ext.losses`, the config in `sft_config.py`, the
reference model in `reference.py`, IFT's first pass in `ift_inputs.py`."""

import inspect

import torch
import trl
from datasets import Dataset, IterableDataset
from peft import PeftModel

from ..citations import Citation
from ..data import warn_if_words_glue
from ..data_checks import check_completions_left, check_dataset_rows, check_datasets_rows
from ..losses import SFTLogps, compute_sft_loss, registered_sft_loss, registered_sft_losses
from ..trl_contract import (
    TRL_SFT_LOSS_TYPES,
    ExpectedForward,
    check_recorded_forwards,
    keep_4bit_layers_differentiable,
    keep_signature_column,
    loss_is_scaled_for_gradient_accumulation,
    record_fused_outputs,
    trl_sft_loss_type_while_constructing,
)
from .ift_inputs import check_first_pass_can_run, ift_inputs
from .metrics import log_means
from .model_args import resolve_model_and_args
from .model_card import CitesItsLosses
from .packed import rows_per_sequence
from .reference import (
    build_reference,
    keep_starting_adapter_as_reference,
    precompute_reference_logps,
    reference_token_logps,
)
from .saving import SavesLoadableModels
from .sft_config import SFTConfig, validate_sft_config


class SFTTrainer(SavesLoadableModels, CitesItsLosses, trl.SFTTrainer):
    """
    [`trl.SFTTrainer`] with the SFT losses registered with [`register_sft_loss`] (`kl_sft`, `ift` and the user's).
    Same constructor as TRL's plus `ref_model` (used by losses with a reference, such as `kl_sft`).

    `nll` and `dft` are TRL's, untouched. Datasets may also be in preference format (`prompt`, `chosen`, `rejected`):
    the trainer learns the `chosen` completion. `model` may be an embedded name such as
    `"embedded:smollm2-135m-instruct"`. KL-SFT's reference is the model as training starts (see
    `trl_ext.trainers.reference`): with a PEFT model whose adapter is already trained, a frozen copy of that adapter.
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
        with trl_sft_loss_type_while_constructing(args):
            super().__init__(model, args, data_collator, train_dataset, eval_dataset, *trainer_args, **trainer_kwargs)
        keep_4bit_layers_differentiable(self.model)
        if registered is not None and registered.ift_inputs:
            check_first_pass_can_run(self, args.loss_type)
        self.ref_model = build_reference(self, ref_model) if uses_reference else None
        if args.precompute_ref_log_probs:  # every batch then carries the reference's log-probs: no reference model
            self.train_dataset, self.eval_dataset, self.data_collator = precompute_reference_logps(self)
            self.ref_model = None

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # Also reached by `evaluate(dataset)`, after construction
        check_dataset_rows(dataset, dataset_name)
        dataset = _chosen_as_completion(dataset, dataset_name)
        warn_if_words_glue(dataset, dataset_name)
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
        check_completions_left(dataset, dataset if packing else prepared, dataset_name,
                               ("completion", args.dataset_text_field, "messages"), args.max_length,
                               tokenizer.eos_token)
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
            unwrapped = self.accelerator.unwrap_model(model)
            ift = ift_inputs(self.model, unwrapped, inputs, self.args, self.state.global_step)
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
        """TRL's `compute_loss` on `inputs` (token ids or IFT's mixed embeddings), and the fused output of the policy
        forward it runs, checked against the contract: one forward over the batch's rows, with gradient when it is
        enabled."""
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
            # 0 for a batch without a target token (a packed row whose prompt fills it), as TRL's NLL gives
            return per_sequence.sum() / max(per_sequence.numel(), 1)
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

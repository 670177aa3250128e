"""`DPOTrainer`: `trl.DPOTrainer` that adds the losses registered with `trl_ext.register_dpo_loss` to TRL's."""

import contextlib
import inspect
import os
import weakref
from dataclasses import replace

import torch
import trl

from .. import citations
from ..data import warn_if_words_glue
from ..data_checks import check_completions_left, check_dataset_rows, check_datasets_rows
from ..losses import LossContext, PreferenceLogps, compute_dpo_loss, registered_dpo_loss
from ..trl_contract import (
    TRL_DPO_CHOSEN_METRICS,
    TRL_DPO_LOSS_TYPES,
    ExpectedForward,
    FusedCausalLMOutput,
    check_recorded_forwards,
    drop_metrics,
    keep_4bit_layers_differentiable,
    metric_mode,
    record_fused_outputs,
    record_last_hidden_states,
)
from . import stepwise_dpo, vocabulary_kl
from .dpo_config import DPOConfig, validate_loss_config
from .metrics import log_means
from .model_args import resolve_model_and_args
from .model_card import CitesItsLosses
from .prefix_sharing import PrefixSharing, check_prefix_sharing_can_run
from .rejected_only import dataset_key, lacks_chosen, named_datasets, placeholder_chosen
from .saving import SavesLoadableModels


@contextlib.contextmanager
def _record_nothing(*models):
    yield []


# Next to the optimizer's state in each checkpoint
LOSS_STATE_FILE = "trl_ext_loss_state.pt"


class DPOTrainer(SavesLoadableModels, CitesItsLosses, trl.DPOTrainer):
    """
    [`trl.DPOTrainer`] that also computes the losses registered with [`register_dpo_loss`] (trl_ext's and the
    user's), and trains in stepwise DPO (sDPO) stages. Same constructor, datasets, metrics and reference-model
    handling as TRL's.

    TRL computes its own loss types and every metric exactly as it would alone; trl_ext's losses are computed from the
    per-sequence log-probs of the same forward passes, added with their `loss_weights`, and log their extra
    metrics as `"{loss_type}/{key}"`. `model` may also be an embedded model name such as
    `"embedded:smollm2-135m-instruct"`.
    """

    _tag_names = ["trl", "trl-ext", "dpo"]

    def __init__(self, model, ref_model=None, args=None, *trainer_args, **trainer_kwargs):
        model, args = resolve_model_and_args(model, args, DPOConfig, "DPO")
        validate_loss_config(args)
        arguments = inspect.signature(trl.DPOTrainer.__init__).bind(self, model, ref_model, args, *trainer_args,
                                                                     **trainer_kwargs).arguments
        check_datasets_rows(arguments.get("train_dataset"), arguments.get("eval_dataset"))  # before the model loads
        # A dataset without `chosen` gets an empty placeholder: no metric of the chosen completions is logged for it
        placeholder = {mode: any(lacks_chosen(dataset, name, args) for name, dataset in named_datasets(datasets, mode))
                       for mode, datasets in (("train", arguments.get("train_dataset")),
                                              ("eval", arguments.get("eval_dataset")))}
        super().__init__(model, ref_model, args, *trainer_args, **trainer_kwargs)
        self.chosen_is_placeholder = placeholder
        keep_4bit_layers_differentiable(self.model)
        self.sharing_prefixes()  # its refusals, before training (if TRL's precompute has not run it already)

        # TRL's loss loop only knows its own names: give it those and keep ours, in the user's order, for later.
        weighted = list(zip(self.loss_types, self.loss_weights, strict=True))
        self.loss_types = [name for name, _ in weighted if name in TRL_DPO_LOSS_TYPES]
        self.loss_weights = [weight for name, weight in weighted if name in TRL_DPO_LOSS_TYPES]
        self.extension_losses = [(name, weight) for name, weight in weighted if name not in TRL_DPO_LOSS_TYPES]
        # Running state of the stateful losses (e.g. beta-DPO's margin statistics), saved with each checkpoint
        self.loss_states = {name: {} for name, _ in self.extension_losses if registered_dpo_loss(name).stateful}
        self.vocabulary_kl_losses = [name for name, _ in self.extension_losses
                                     if registered_dpo_loss(name).vocabulary_kl]
        if self.vocabulary_kl_losses:
            vocabulary_kl.check_plain_lm_head(self.model, self.vocabulary_kl_losses)
        if getattr(self.args, "sdpo_stages", 1) > 1:  # a `trl.DPOConfig` has no stages
            stepwise_dpo.check_stages_can_run(self)
            self.stepwise_reference = stepwise_dpo.StepwiseReference(self)
            self.add_callback(self.stepwise_reference)

    # Stepwise DPO's stage references (`sdpo_stages > 1`)
    stepwise_reference = None

    def sharing_prefixes(self):
        """A context in which the policy's and the reference's forwards run on shared rows, with `prefix_sharing`.
        Built for the models of the moment: TRL drops its reference after precomputing its log-probs."""
        if not getattr(self.args, "prefix_sharing", False):  # a `trl.DPOConfig` has no such field
            return contextlib.nullcontext()
        models = [self.accelerator.unwrap_model(model) for model in (self.model, self.ref_model) if model is not None]
        # Each model is checked once (TRL's precompute may come first, inside `__init__`)
        checked = vars(self).setdefault("prefix_sharing_checked", weakref.WeakSet())
        for model in models:
            if model not in checked:
                check_prefix_sharing_can_run(model, self.args.max_length, self.aux_loss_enabled,
                                             sharded=self.is_fsdp_enabled)
                checked.add(model)
        return PrefixSharing(models).active()

    # The prepared datasets whose chosen completions are placeholders, by `dataset_key`
    placeholder_chosen_datasets = frozenset()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        check_dataset_rows(dataset, dataset_name)  # also reached by `evaluate(dataset)`
        without_chosen = lacks_chosen(dataset, dataset_name, args)
        if without_chosen:
            dataset = dataset.map(placeholder_chosen)
        warn_if_words_glue(dataset, dataset_name)
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if without_chosen:
            self.placeholder_chosen_datasets |= {dataset_key(prepared)}
        completions = ("rejected",) if without_chosen else ("chosen", "rejected")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
        check_completions_left(dataset, prepared, dataset_name, completions, args.max_length, tokenizer.eos_token)
        return prepared

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # The chosen metrics are dropped for a dataset whose chosen completions are placeholders, and only for it
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        previous = self.chosen_is_placeholder["eval"]
        if not isinstance(dataset, dict):  # a dict is evaluated one dataset at a time, through this method again
            self.chosen_is_placeholder["eval"] = (dataset_key(dataset) in self.placeholder_chosen_datasets
                                                  or lacks_chosen(dataset, metric_key_prefix, self.args))
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self.chosen_is_placeholder["eval"] = previous

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL precomputes inside its constructor: the first forward without gradient in eval mode, after which
        # bitsandbytes would move 4-bit layers to a kernel without backward on some CPUs
        keep_4bit_layers_differentiable(self.model)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        with self.sharing_prefixes():
            return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        if self.stepwise_reference is not None:
            inputs = self.stepwise_reference.with_stage_reference_logps(inputs, self.model.training)
        with self.sharing_prefixes():
            result = self.trl_and_registered_losses(model, inputs, return_outputs)
        if self.chosen_is_placeholder[metric_mode(self)]:
            drop_metrics(self, TRL_DPO_CHOSEN_METRICS)
        return result

    def trl_and_registered_losses(self, model, inputs, return_outputs):
        """TRL's loss on `inputs`, plus each registered loss in `loss_type` computed from the log-probs of TRL's own
        forwards and weighted by `loss_weights`."""
        if not self.extension_losses:
            return super()._compute_loss(model, inputs, return_outputs)

        # TRL runs the policy first, then (unless reference log-probs are precomputed) the reference: `ref_model`,
        # or the policy itself with its adapter disabled.
        reference = [self.ref_model] if self.ref_model is not None else []
        policy_has_grad = torch.is_grad_enabled()
        record_hidden = record_last_hidden_states if self.vocabulary_kl_losses else _record_nothing
        with record_fused_outputs(self.accelerator, model, *reference) as fused_outputs, \
                record_hidden(self.accelerator, model, *reference) as hidden_states:
            result = super()._compute_loss(model, inputs, return_outputs)
        loss, outputs = result if return_outputs else (result, None)

        self._check_forwards(inputs, fused_outputs, policy_has_grad)
        batch = self._preference_logps(inputs, fused_outputs)
        if self.vocabulary_kl_losses:
            if return_outputs:  # TRL's extra plain forward for `compute_metrics`' logits, after its loss's forwards
                hidden_states = hidden_states[:-1]
            chosen_token_kl, rejected_token_kl = vocabulary_kl.token_kls(self, inputs, hidden_states)
            batch = replace(batch, chosen_token_kl=chosen_token_kl, rejected_token_kl=rejected_token_kl)
        metrics = {}
        for name, weight in self.extension_losses:
            loss_batch = batch
            if name in self.loss_states:
                context = LossContext(self.loss_states[name], self.model.training, self.accelerator.gather,
                                      self.accelerator.process_index)
                loss_batch = replace(batch, context=context)
            output = compute_dpo_loss(name, loss_batch, self.args)
            loss = loss + output.losses.mean() * weight
            metrics.update({f"{name}/{key}": value for key, value in output.metrics.items()})
        log_means(self, metrics)
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

        def token_logps(output: FusedCausalLMOutput):
            # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real tokens, as TRL does.
            return output.log_probs[:, -seq_len:].chunk(2)

        chosen_token_logps, rejected_token_logps = token_logps(fused_outputs[0])
        if self.precompute_ref_logps:
            ref_chosen_token_logps = ref_rejected_token_logps = None
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_token_logps, ref_rejected_token_logps = token_logps(fused_outputs[1])
            ref_chosen_logps, ref_rejected_logps = ref_chosen_token_logps.sum(1), ref_rejected_token_logps.sum(1)
        chosen_mask, rejected_mask = completion_mask.chunk(2)
        return PreferenceLogps(
            chosen_logps=chosen_token_logps.sum(dim=1),
            rejected_logps=rejected_token_logps.sum(dim=1),
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            chosen_lengths=chosen_mask.sum(dim=1).float(),
            rejected_lengths=rejected_mask.sum(dim=1).float(),
            chosen_token_logps=chosen_token_logps,
            rejected_token_logps=rejected_token_logps,
            ref_chosen_token_logps=ref_chosen_token_logps,
            ref_rejected_token_logps=ref_rejected_token_logps,
            chosen_mask=chosen_mask,
            rejected_mask=rejected_mask,
        )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.loss_states and self.args.should_save:
            torch.save(self.loss_states, os.path.join(output_dir, LOSS_STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.loss_states:
            return
        path = os.path.join(checkpoint, LOSS_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by a trainer with the stateful losses "
                f"{list(self.loss_states)}, so their state cannot be restored. Resume from a checkpoint of this run."
            )
        saved = torch.load(path, map_location=self.accelerator.device, weights_only=True)
        for name, state in self.loss_states.items():
            state.update(saved.get(name, {}))

    def loss_papers(self) -> list[citations.Citation]:
        """The papers of the losses in `loss_type`: DPO's for TRL's own, each registered loss's own if it has one."""
        papers = [citations.DPO if name in TRL_DPO_LOSS_TYPES else registered_dpo_loss(name).citation
                  for name in self.args.loss_type]
        return [paper for paper in papers if paper is not None]

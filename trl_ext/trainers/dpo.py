"""Drop-in `DPOConfig` / `DPOTrainer` that add the losses registered with `trl_ext.register_dpo_loss` to TRL's."""

import contextlib
import inspect
import math
import os
from dataclasses import dataclass, field, replace

import torch
import trl
from datasets import Dataset, IterableDataset

from .. import citations
from ..config_checks import check_training_fields
from ..data import warn_if_words_glue
from ..data_checks import check_completions_left, check_dataset_rows, check_datasets_rows
from ..embedded import resolve_model_and_args
from ..losses import (
    LossContext,
    PreferenceLogps,
    compute_dpo_loss,
    registered_dpo_loss,
    registered_dpo_losses,
)
from ..trl_contract import (
    TRL_DPO_CHOSEN_METRICS,
    TRL_DPO_LOSS_TYPES,
    ExpectedForward,
    FusedCausalLMOutput,
    check_recorded_forwards,
    default_bf16_to_what_the_machine_supports,
    drop_metrics,
    keep_4bit_layers_differentiable,
    record_fused_outputs,
    record_last_hidden_states,
)
from . import stepwise_dpo, vocabulary_kl
from .metrics import log_means
from .model_card import CitesItsLosses
from .saving import SavesLoadableModels


@dataclass
class DPOConfig(trl.DPOConfig):
    r"""
    [`trl.DPOConfig`] with trl_ext's extra loss types.

    `loss_type` takes TRL's values plus every name registered with [`register_dpo_loss`]. trl_ext ships `"dpop"`
    (DPO-Positive on summed log-probs), `"dpop_norm"` (the same on per-token averaged log-probs), `"cdpo"`
    (conservative DPO, with TRL's `label_smoothing`), `"rdpo"` (R-DPO's length regulariser), `"beta_dpo"` (a
    per-batch beta), `"npo"` (Negative Preference Optimization on the rejected completions) and `"tdpo1"` /
    `"tdpo2"` (token-level DPO). They combine with TRL's through the `loss_type` list and `loss_weights`, e.g.
    `loss_type=["dpop", "sft"]`.

    `beta` must be > 0 (and finite) for every loss but TRL's `sft`: it is the temperature of the preference margin in
    TRL's losses and trl_ext's (and a loss registered by the user is assumed to read it too), or the regularisation
    strength `ipo` and `sppo_hard` divide by. A negative `beta` trains the opposite preference while the reward
    metrics, scaled by it, look like success; `0` learns nothing. `sft` alone (the chosen completion's NLL) reads none.

    Parameters:
        dpop_lambda (`float`, *optional*, defaults to `50.0`):
            Weight of DPOP's penalty `max(0, -(log pi(y_w) - log ref(y_w)))`, applied inside the sigmoid and scaled by
            `beta`. Must be >= 0; `0` is exactly DPO. The paper uses 50 (with `beta=0.3`) and reports little
            sensitivity in [5, 500]. Used by `"dpop"` and `"dpop_norm"`.
        rdpo_alpha (`float`, *optional*, defaults to `0.01`):
            R-DPO's length weight: `rdpo_alpha * (|y_w| - |y_l|)` (in tokens) is added inside the sigmoid, outside
            `beta`, so length explains part of each preference. Must be >= 0; `0` is exactly DPO. The paper tunes it per setting; 0.01 is trl_ext's
            starting point, not a value the paper prescribes.
        beta_dpo_alpha (`float`, *optional*, defaults to `0.5`):
            beta-DPO's `alpha` in `beta_batch = beta * (1 + alpha * (M_batch - M_running))`; `beta` is the paper's
            `beta_0`. Must be >= 0; `0` with `beta_dpo_filter_ratio=0` is exactly DPO. The authors' config leaves it
            at 0 and their runs set it per model; 0.5 is trl_ext's choice.
        beta_dpo_momentum (`float`, *optional*, defaults to `0.9`):
            Momentum of the running mean and standard deviation of the margin (the authors' code: 0.9), in [0, 1).
        beta_dpo_filter_ratio (`float`, *optional*, defaults to `0.2`):
            Share of each batch's pairs beta-DPO drops, preferring those whose margin is far from the running mean
            (the authors' config: 0.2), in [0, 1); `0` keeps every pair.
        tdpo_alpha (`float`, *optional*, defaults to `0.5`):
            TDPO2's weight of the sequential-KL difference (the authors' code: 0.5), >= 0.
        sdpo_stages (`int`, *optional*, defaults to `1`):
            Stepwise DPO (sDPO, Kim et al. 2024; not TRL's Self-Distillation Policy Optimization): split training
            into this many equal stages of optimizer steps; at each stage boundary the current policy becomes the
            reference (with `precompute_ref_log_probs`, its log-probs are precomputed again). Works with any
            `loss_type`; `1` is plain training.
    """

    # TRL's help lists only its own values; `--help` lists trl_ext's too.
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"Loss types to combine (with `loss_weights`): TRL's {', '.join(TRL_DPO_LOSS_TYPES)}; "
                          f"trl_ext's {', '.join(registered_dpo_losses())}; or a loss registered with "
                          "`trl_ext.register_dpo_loss`."},
    )
    dpop_lambda: float = field(
        default=50.0,
        metadata={"help": "Weight of the DPOP penalty (>= 0; 0 is exactly DPO). Used by `dpop` and `dpop_norm`."},
    )
    rdpo_alpha: float = field(
        default=0.01, metadata={"help": "R-DPO's weight of the length difference in tokens (>= 0; 0 is DPO)."}
    )
    beta_dpo_alpha: float = field(default=0.5, metadata={"help": "beta-DPO's scaling of beta by the margin (>= 0)."})
    beta_dpo_momentum: float = field(
        default=0.9, metadata={"help": "Momentum of beta-DPO's running margin statistics, in [0, 1)."}
    )
    beta_dpo_filter_ratio: float = field(
        default=0.2, metadata={"help": "Share of each batch beta-DPO drops as margin outliers, in [0, 1)."}
    )
    tdpo_alpha: float = field(default=0.5, metadata={"help": "TDPO2's weight of the sequential-KL difference."})
    sdpo_stages: int = field(
        default=1, metadata={"help": "Stepwise DPO (sDPO, Kim et al. 2024) stages: the policy becomes the reference at "
                                    "each boundary (1: plain training)."}
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
    stages = getattr(args, "sdpo_stages", 1)
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"`sdpo_stages` must be an integer >= 1, got {stages!r}.")
    if stages > 1 and args.sync_ref_model:
        raise ValueError(
            f"`sdpo_stages={stages}` makes the policy the reference at each stage boundary, while "
            "`sync_ref_model=True` (TR-DPO) blends the policy into the reference every `ref_model_sync_steps`: together "
            "they would train neither method. Set `sync_ref_model=False` or `sdpo_stages=1`."
        )
    unknown = [name for name in loss_types if name not in valid]
    if unknown:
        raise ValueError(
            f"Unknown `loss_type` {unknown}. Valid values: TRL's {list(TRL_DPO_LOSS_TYPES)} and trl_ext's "
            f"{list(registered_dpo_losses())}. Custom losses must be registered with "
            "`trl_ext.register_dpo_loss` before the config is created."
        )
    _check_beta(args, loss_types)
    check_training_fields(args)
    extension = [name for name in loss_types if name in registered_dpo_losses()]
    if not extension:
        return
    if not isinstance(args, DPOConfig):
        raise TypeError(f"`loss_type` {extension} needs a `trl_ext.DPOConfig`, got a `{type(args).__qualname__}`.")
    for name in extension:
        registered = registered_dpo_loss(name)
        if registered.validate is not None:
            registered.validate(args)
        if registered.token_logps and args.precompute_ref_log_probs:
            raise ValueError(
                f"`loss_type` `{name}` reads the reference's per-token log-probs, but `precompute_ref_log_probs=True` "
                "keeps only their sums: set it to False."
            )
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


# The loss types that read no `beta`: `sft` is the NLL of the chosen completion.
LOSSES_WITHOUT_BETA = ("sft",)


def _check_beta(args: trl.DPOConfig, loss_types: list[str]) -> None:
    reading = [name for name in loss_types if name not in LOSSES_WITHOUT_BETA]
    if reading and not args.beta > 0:
        raise ValueError(
            f"`beta` must be > 0 for {', '.join(f'`{name}`' for name in reading)}, got {args.beta}: it scales the "
            "preference margin (for `ipo` and `sppo_hard`, it is the regularisation strength they divide by). A "
            "negative beta trains the opposite preference while the reward metrics, scaled by it, look like success; "
            "0 learns nothing. Use a positive value, e.g. 0.1 (the default)."
        )


@contextlib.contextmanager
def _record_nothing(*models):
    yield []


# Next to the optimizer's state in each checkpoint
LOSS_STATE_FILE = "trl_ext_loss_state.pt"


class DPOTrainer(SavesLoadableModels, CitesItsLosses, trl.DPOTrainer):
    """
    [`trl.DPOTrainer`] that also computes the losses registered with [`register_dpo_loss`] (trl_ext's and the
    user's), and trains in stepwise DPO (sDPO) stages. Same constructor, datasets, metrics and reference-model handling as TRL's.

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
        super().__init__(model, ref_model, args, *trainer_args, **trainer_kwargs)
        keep_4bit_layers_differentiable(self.model)

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

    # Set when a dataset without `chosen` got the placeholder: no metric of the chosen completions is logged then
    chosen_is_placeholder = False
    # Stepwise DPO's stage references (`sdpo_stages > 1`)
    stepwise_reference = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        check_dataset_rows(dataset, dataset_name)  # also reached by `evaluate(dataset)`
        if _check_preference_columns(dataset, dataset_name, args):
            dataset = dataset.map(_placeholder_chosen)
            self.chosen_is_placeholder = True
        warn_if_words_glue(dataset, dataset_name)
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        completions = ("rejected",) if self.chosen_is_placeholder else ("chosen", "rejected")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
        check_completions_left(dataset, prepared, dataset_name, completions, args.max_length, tokenizer.eos_token)
        return prepared

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL precomputes inside its constructor: the first forward without gradient in eval mode, after which
        # bitsandbytes would move 4-bit layers to a kernel without backward on some CPUs
        keep_4bit_layers_differentiable(self.model)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _compute_loss(self, model, inputs, return_outputs):
        if self.stepwise_reference is not None:
            inputs = self.stepwise_reference.with_stage_reference_logps(inputs, self.model.training)
        result = self._compute_losses(model, inputs, return_outputs)
        if self.chosen_is_placeholder:
            drop_metrics(self, TRL_DPO_CHOSEN_METRICS)
        return result

    def _compute_losses(self, model, inputs, return_outputs):
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
            chosen_token_kl, rejected_token_kl = vocabulary_kl.token_kls(self, inputs, hidden_states)
            batch = replace(batch, chosen_token_kl=chosen_token_kl, rejected_token_kl=rejected_token_kl)
        metrics = {}
        for name, weight in self.extension_losses:
            loss_batch = batch
            if name in self.loss_states:
                context = LossContext(self.loss_states[name], self.model.training, self.accelerator.gather)
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


def _check_preference_columns(dataset, dataset_name: str, args) -> bool:
    """Fails before training if `dataset` lacks the columns the losses read; True if it has `prompt` and `rejected`
    but no `chosen`, which only losses registered with `rejected_only=True` accept (the chosen one is a placeholder)."""
    if not isinstance(dataset, Dataset | IterableDataset) or dataset.column_names is None:
        return False  # streaming datasets with unknown columns are checked by TRL when the first batch is built
    columns = set(dataset.column_names)
    if {"chosen", "rejected"} <= columns or {"chosen_ids", "rejected_ids"} <= columns:
        return False
    if {"prompt", "rejected"} <= columns:
        loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        reading_chosen = [name for name in loss_types
                          if name not in registered_dpo_losses() or not registered_dpo_loss(name).rejected_only]
        if not reading_chosen:
            return True
        rejected_only = [name for name in registered_dpo_losses() if registered_dpo_loss(name).rejected_only]
        raise ValueError(
            f"The {dataset_name} dataset has no `chosen` column, which `loss_type` {reading_chosen} reads. Add "
            f"`chosen` completions, or train only losses that read the rejected completion alone ({rejected_only})."
        )
    raise ValueError(
        f"The {dataset_name} dataset needs `chosen` and `rejected` columns (and optionally `prompt`), TRL's "
        f"preference format; it has {sorted(columns)}. Rename or map your columns, e.g. "
        "`dataset.rename_columns({'response_j': 'chosen', 'response_k': 'rejected'})`."
    )


def _placeholder_chosen(example: dict) -> dict:
    """An empty chosen completion, in the rejected one's format: TRL tokenizes it to the EOS token (or the chat
    template's empty assistant turn)."""
    conversational = isinstance(example["rejected"], list)
    return {"chosen": [{"role": "assistant", "content": ""}] if conversational else ""}

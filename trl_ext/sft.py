"""Drop-in `SFTConfig` / `SFTTrainer` that add KL-SFT and IFT to TRL's `nll` and `dft` losses."""

import contextlib
from dataclasses import dataclass, field

import torch
import trl
from accelerate.utils import is_peft_model, tqdm
from datasets import Dataset, IterableDataset
from trl.experimental.utils import create_reference_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, use_adapter

from . import losses
from ._fused import record_fused_outputs
from .embedded import resolve_model_and_args

TRL_SFT_LOSS_TYPES = ("nll", "dft")
SFT_LOSS_TYPES = TRL_SFT_LOSS_TYPES + ("kl_sft", "ift")
KL_PENALTIES = {"sq_logratio": losses.sq_logratio_penalty, "token_kl": losses.token_kl_penalty}
IFT_PREDICTIONS = ("greedy", "soft")
IFT_LAMBDA_SCHEDULES = ("constant", "linear")
# Rows of (positions x vocabulary) logits IFT's first pass holds at once
IFT_PREDICTION_CHUNK = 256


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
            map-style datasets without packing or padding-free batches.
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
            Length of the linear schedule in optimizer steps.
        ift_detach_weights (`bool`, *optional*, defaults to `False`):
            Whether to stop the gradient through the relation-propagation weights (the official code does not).
    """

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
    for name in ("ift_lambda", "ift_gamma", "ift_lambda_min"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"`{name}` must be in [0, 1], got {getattr(args, name)}.")
    if args.ift_prediction not in IFT_PREDICTIONS:
        raise ValueError(f"Unknown `ift_prediction` '{args.ift_prediction}'. Valid values: {list(IFT_PREDICTIONS)}.")
    if args.ift_lambda_schedule not in IFT_LAMBDA_SCHEDULES:
        raise ValueError(
            f"Unknown `ift_lambda_schedule` '{args.ift_lambda_schedule}'. Valid values: {list(IFT_LAMBDA_SCHEDULES)}."
        )
    if args.ift_lambda_min > args.ift_lambda:
        raise ValueError(f"`ift_lambda_min` ({args.ift_lambda_min}) must be <= `ift_lambda` ({args.ift_lambda}).")
    if args.ift_lambda_warmup_steps < 0:
        raise ValueError(f"`ift_lambda_warmup_steps` must be >= 0, got {args.ift_lambda_warmup_steps}.")
    if args.precompute_ref_log_probs and args.loss_type != "kl_sft":
        raise ValueError(
            f"`precompute_ref_log_probs=True` is for `loss_type='kl_sft'`; `{args.loss_type}` has no reference model."
        )
    if args.precompute_ref_log_probs and (args.packing or args.padding_free):
        raise ValueError("`precompute_ref_log_probs=True` does not support `packing` or `padding_free`.")
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
        model, args = resolve_model_and_args(model, args, SFTConfig, "SFT")
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
        if args.precompute_ref_log_probs:
            # Every process computes the whole dataset (no gather of variable-length rows), once, before training.
            self.train_dataset = self._with_reference_logps(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {name: self._with_reference_logps(d) for name, d in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._with_reference_logps(self.eval_dataset)
            self.data_collator = _PadReferenceLogps(self.data_collator)
            self.ref_model = None  # not needed any more: free it

    def _with_reference_logps(self, dataset: Dataset) -> Dataset:
        """Adds a `ref_token_logps` column: each example's reference log-probs, aligned with its shifted labels."""
        if not isinstance(dataset, Dataset):
            raise ValueError("`precompute_ref_log_probs=True` needs map-style datasets, not an `IterableDataset`.")
        inputs_only = dataset.select_columns([name for name in ("input_ids", "labels") if name in dataset.column_names])
        loader = torch.utils.data.DataLoader(
            inputs_only, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator
        )
        rows = []
        for batch in tqdm(loader, desc="Computing reference log-probs", disable=not self.is_local_process_zero()):
            batch = self._prepare_inputs(batch)
            token_logps = self._reference_token_logps(batch).cpu()
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            rows += [row[: length - 1].tolist() for row, length in zip(token_logps, lengths, strict=True)]
        return dataset.add_column("ref_token_logps", rows)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # Also reached by `evaluate(dataset)`, after construction
        dataset = _chosen_as_completion(dataset)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.precompute_ref_log_probs and "ref_token_logps" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "ref_token_logps"]

    def _build_reference(self, ref_model):
        """The frozen reference of `kl_sft`: `ref_model`, else a frozen copy of the policy, else `None` when the policy
        itself serves: with its PEFT adapter disabled, or untrained while reference log-probs are precomputed."""
        if ref_model is None and (is_peft_model(self.model) or self.args.precompute_ref_log_probs):
            return None
        if ref_model is None:
            ref_model = create_reference_model(self.model)  # a frozen copy, fused head included
        else:
            add_fused_lm_head(ref_model)
        ref_model.requires_grad_(False).eval()  # eval: no dropout in the reference
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.loss_type == "kl_sft":
            return self._kl_sft_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.args.loss_type == "ift":
            return self._ift_loss(model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _kl_sft_loss(self, model, inputs, return_outputs, num_items_in_batch):
        inputs = dict(inputs)
        precomputed = inputs.pop("ref_token_logps", None)
        with record_fused_outputs(self.accelerator.unwrap_model(model)) as fused_outputs:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        policy_token_logps, mask = fused_outputs[0].log_probs, fused_outputs[0].label_mask
        ref_token_logps = precomputed if precomputed is not None else self._reference_token_logps(inputs)
        # The NLL term as TRL reduces it: a mean over every target token of the batch, on all processes
        mode = "train" if self.model.training else "eval"
        nll_sum = self.accelerator.gather(-(policy_token_logps.detach() * mask).sum()).sum()
        num_tokens = self.accelerator.gather(mask.sum()).sum().clamp(min=1)
        mask, policy_token_logps, ref_token_logps = _rows_per_sequence(inputs, mask, policy_token_logps,
                                                                       ref_token_logps)
        penalty = KL_PENALTIES[self.args.kl_penalty](policy_token_logps, ref_token_logps, mask)
        loss = loss + self.args.kl_coef * penalty.mean() / self._accumulation_divisor(num_items_in_batch)
        self._log_means({
            "kl/penalty": penalty,
            "logps/policy": losses.sequence_mean(policy_token_logps, mask),
            "logps/ref": losses.sequence_mean(ref_token_logps, mask),
        })
        self._metrics[mode]["kl/nll"].append((nll_sum / num_tokens).item())
        return (loss, outputs) if return_outputs else loss

    def _ift_loss(self, model, inputs, return_outputs, num_items_in_batch):
        labels = inputs["labels"]
        # Completion positions other than a sequence's first token get a mixed input; their prediction comes from the
        # previous position, which is then inside the same sequence (TRL's padding-free collator already ignores the
        # label of each packed sequence's first token).
        mix_mask = labels != -100
        mix_mask[:, 0] = False
        ift_lambda = self.current_ift_lambda()
        unwrapped = self.accelerator.unwrap_model(model)
        embedding = unwrapped.get_input_embeddings()

        with torch.no_grad():
            predicted_embeds, teacher_forced_nll = self._ift_predictions(unwrapped, inputs, mix_mask)
        teacher_forced_mask, teacher_forced_nll = _rows_per_sequence(inputs, mix_mask, teacher_forced_nll,
                                                                     shifted=False)
        token_embeds = embedding(inputs["input_ids"])
        mixed_embeds = losses.ift_mix_embeddings(token_embeds, predicted_embeds, mix_mask, ift_lambda)
        mixed_inputs = {key: value for key, value in inputs.items() if key != "input_ids"}
        mixed_inputs["inputs_embeds"] = mixed_embeds

        # TRL's forward on the mixed inputs gives the per-token log-probs and its own metrics; IFT replaces its loss.
        with record_fused_outputs(unwrapped) as fused_outputs:
            result = super().compute_loss(model, mixed_inputs, return_outputs, num_items_in_batch)
        outputs = result[1] if return_outputs else None
        mask, token_nll = _rows_per_sequence(inputs, fused_outputs[0].label_mask, -fused_outputs[0].log_probs)
        per_sequence = losses.ift_loss(token_nll, mask, self.args.ift_gamma, self.args.ift_detach_weights)
        loss = per_sequence.mean() / self._accumulation_divisor(num_items_in_batch)
        self._log_means({
            "ift/lambda": torch.tensor([ift_lambda], device=mask.device),
            "ift/nll_teacher_forced": losses.sequence_mean(teacher_forced_nll, teacher_forced_mask),
            "ift/nll_mixed": losses.sequence_mean(token_nll, mask),
        })
        return (loss, outputs) if return_outputs else loss

    def current_ift_lambda(self) -> float:
        """IFT's mixing weight at the current optimizer step."""
        args = self.args
        if args.ift_lambda_schedule == "constant" or self.state.global_step >= args.ift_lambda_warmup_steps:
            return args.ift_lambda
        progress = self.state.global_step / args.ift_lambda_warmup_steps
        return args.ift_lambda_min + (args.ift_lambda - args.ift_lambda_min) * progress

    def _ift_predictions(self, unwrapped, inputs, mix_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """IFT's first pass: the predicted embedding for each masked position `(B, T, H)`, zero elsewhere, and the
        teacher-forced NLL `(B, T)` of each masked position's token, zero elsewhere.

        Runs the backbone once and the LM head only on the positions that feed a prediction, in chunks, so no
        `(B, T, vocab)` logits exist.
        """
        causal_lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        backbone_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if key in inputs}
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            hidden = causal_lm.base_model(**backbone_inputs, use_cache=False).last_hidden_state
        lm_head = causal_lm.get_output_embeddings()
        embedding_matrix = unwrapped.get_input_embeddings().weight
        source_hidden = hidden[:, :-1][mix_mask[:, 1:]]  # the position before each masked one
        targets = inputs["input_ids"][mix_mask]
        predicted, nll = [], []
        for start in range(0, source_hidden.size(0), IFT_PREDICTION_CHUNK):
            logits = lm_head(source_hidden[start : start + IFT_PREDICTION_CHUNK])
            chunk_targets = targets[start : start + IFT_PREDICTION_CHUNK]
            log_probs = logits.float().log_softmax(dim=-1)
            nll.append(-log_probs.gather(1, chunk_targets.unsqueeze(1)).squeeze(1))
            if self.args.ift_prediction == "greedy":
                predicted.append(embedding_matrix[logits.argmax(dim=-1)])
            else:
                predicted.append(log_probs.exp().to(embedding_matrix.dtype) @ embedding_matrix)
        predicted_embeds = hidden.new_zeros(*mix_mask.shape, embedding_matrix.size(1), dtype=embedding_matrix.dtype)
        token_nll = hidden.new_zeros(mix_mask.shape, dtype=torch.float32)
        if predicted:
            predicted_embeds[mix_mask] = torch.cat(predicted)
            token_nll[mix_mask] = torch.cat(nll)
        return predicted_embeds, token_nll

    def _accumulation_divisor(self, num_items_in_batch) -> int:
        # As for TRL's MoE aux loss: with `num_items_in_batch`, the Trainer leaves gradient accumulation to the loss,
        # so a per-micro-batch mean is averaged over the accumulation steps here.
        return self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1

    def _log_means(self, values: dict[str, torch.Tensor]) -> None:
        """Logs the mean of each per-sequence tensor over the batch and the processes."""
        mode = "train" if self.model.training else "eval"
        for key, value in values.items():
            self._metrics[mode][key].append(self.accelerator.gather(value.detach().float()).mean().item())

    def _reference_token_logps(self, inputs) -> torch.Tensor:
        """`(B, T - 1)` log-probability of each label under the reference, 0 where the label is ignored."""
        policy_is_reference = self.ref_model is None and not is_peft_model(self.model)
        if policy_is_reference and self.state.global_step > 0:
            raise ValueError(
                "This batch has no precomputed reference log-probs, and after training has started no reference model "
                "is left (`precompute_ref_log_probs=True`, full fine-tuning): pass evaluation data as `eval_dataset` "
                "when creating the trainer, or pass a `ref_model`."
            )
        model_inputs = {**inputs, "use_cache": False, "fused_lm_head": True}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is not None:
                return self.ref_model(**model_inputs).log_probs
            if policy_is_reference:  # before the first step, the untrained policy is the reference
                return self.model(**model_inputs).log_probs
            unwrapped = self.accelerator.unwrap_model(self.model)
            # A new adapter disabled is the base model; an adapter loaded for re-training keeps a copy named "ref".
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return self.model(**model_inputs).log_probs


def _rows_per_sequence(inputs, mask, *token_values, shifted: bool = True) -> tuple[torch.Tensor, ...]:
    """`mask` and `token_values` with one row per sequence, so that per-sequence reductions stay within a sequence.

    A padding-free batch (packing) is one row of sequences laid end to end: it is split at TRL's sequence offsets,
    dropping the sequences without a target (padding). Other batches are returned as they are. With `shifted`, the
    tensors are `(B, T - 1)` and position `t` holds the label of token `t + 1`.
    """
    if "cu_seq_lens_q" not in inputs:
        return (mask, *token_values)
    offsets = inputs["cu_seq_lens_q"].to(mask.device)
    if shifted:
        offsets = (offsets - 1).clamp(min=0)
    rows = [losses.unpack_sequences(values, offsets) for values in (mask, *token_values)]
    has_targets = rows[0].any(dim=1)
    return tuple(row[has_targets] for row in rows)


class _PadReferenceLogps:
    """Wraps a collator to pad each example's `ref_token_logps` to the batch's `(B, T - 1)` shifted labels."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        if "ref_token_logps" not in examples[0]:  # data prepared after construction, e.g. passed to `evaluate`
            return self.collator(examples)
        ref_rows = [torch.tensor(example.pop("ref_token_logps")) for example in examples]
        batch = self.collator(examples)
        padded = torch.zeros(len(ref_rows), batch["input_ids"].size(1) - 1)
        for row, values in zip(padded, ref_rows, strict=True):
            row[: len(values)] = values  # TRL's collator pads on the right
        batch["ref_token_logps"] = padded
        return batch


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

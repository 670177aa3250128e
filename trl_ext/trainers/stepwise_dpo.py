"""Stepwise DPO (sDPO, Kim et al. 2024, "sDPO: Don't Use Your Data All at Once"): training in stages, each against
the policy as the previous stage left it. (Not TRL's `trl.experimental.sdpo`, Self-Distillation Policy Optimization.)

`sdpo_stages=N` splits the run's optimizer steps into `N` equal stages (the data of each stage is the next part of
the shuffled dataset, so with at most one epoch the stages see disjoint data, as in the paper's partition). At each
stage boundary the current policy becomes the reference: a PEFT policy's adapter is copied into the `"ref"`
adapter TRL's reference forward uses; a separate reference model (the `ref_model` passed, or TRL's frozen copy under
full fine-tuning) is overwritten with the policy's weights. Any DPO-family `loss_type` works; one stage is plain
training.

With `precompute_ref_log_probs=True`, TRL's precompute runs again at each boundary, with the new reference (the
policy itself under full fine-tuning), over the train and eval datasets. The train dataloader was built for the
epoch, and prefetches, so the new values cannot reach it through the dataset: the trainer replaces the batch's
`ref_chosen_logps` / `ref_rejected_logps` by the recomputed values of the same pairs (`StepwiseReference`), found by
content (`pair_keys`): the reference log-probs are a function of the token ids and the completion mask alone.
"""

import hashlib

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback

from ..trl_contract import TRLContractError, precompute_ref_logps_again
from .reference import keep_starting_adapter_as_reference

REFERENCE_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]
# Pairs collated at once to key the recomputed values
KEY_BATCH = 256


def stage_boundaries(max_steps: int, stages: int) -> list[int]:
    """The optimizer steps after which a new stage starts: `round(k * max_steps / stages)`, `k = 1 .. stages - 1`."""
    return [round(k * max_steps / stages) for k in range(1, stages)]


def check_stages_can_run(trainer) -> None:
    """Refuses, before training, the setups whose reference trl_ext cannot replace by the policy."""
    stages = trainer.args.sdpo_stages
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise ValueError(f"`sdpo_stages={stages}` (stepwise DPO) is not supported under FSDP or DeepSpeed, whose "
                         "sharded weights it cannot copy into the reference: use DDP, or `sdpo_stages=1`.")
    if trainer.ref_model is not None and is_peft_model(trainer.model):
        raise ValueError(f"`sdpo_stages={stages}` (stepwise DPO) with a PEFT policy uses its adapter as the next "
                         "reference: do not pass a separate `ref_model`.")


def use_policy_as_reference(accelerator, policy, ref_model) -> None:
    """Makes the reference of the following steps the policy as it is now: `ref_model` takes its weights, or a PEFT
    policy's `"ref"` adapter its trained one. Under full fine-tuning with precomputed reference log-probs there is no
    reference model: TRL's precompute runs the policy itself."""
    policy = accelerator.unwrap_model(policy)
    if ref_model is not None:
        accelerator.unwrap_model(ref_model).load_state_dict(policy.state_dict())
    elif is_peft_model(policy):
        keep_starting_adapter_as_reference(policy)


def recompute_reference_logps(trainer) -> dict[bytes, tuple[float, float]]:
    """The reference log-probs `(chosen, rejected)` of every pair of the train and eval datasets under the reference
    as it is now, by `pair_keys`, computed by TRL's precompute (its on-disk cache keyed on the new weights, so that
    `evaluate()` precomputes against them too)."""
    args = trainer.args
    datasets = [("train", trainer.train_dataset, args.precompute_ref_batch_size or args.per_device_train_batch_size)]
    eval_datasets = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"eval": trainer.eval_dataset}
    datasets += [(name, dataset, args.precompute_ref_batch_size or args.per_device_eval_batch_size)
                 for name, dataset in eval_datasets.items() if dataset is not None]
    policy = trainer.accelerator.unwrap_model(trainer.model)
    reference = trainer.accelerator.unwrap_model(trainer.ref_model or trainer.model)
    training = policy.training
    policy.eval()  # as at init: no dropout in the reference's log-probs
    try:
        recomputed = precompute_ref_logps_again(trainer, reference, [
            (dataset.remove_columns(REFERENCE_COLUMNS), name, batch_size) for name, dataset, batch_size in datasets])
    finally:
        policy.train(training)
    lookup = {}
    for dataset in recomputed:
        for chunk in dataset.iter(batch_size=KEY_BATCH):
            examples = [dict(zip(chunk, values, strict=True)) for values in zip(*chunk.values(), strict=True)]
            batch = trainer.data_collator(examples)
            values = zip(chunk["ref_chosen_logps"], chunk["ref_rejected_logps"], strict=True)
            lookup.update(zip(pair_keys(batch), values, strict=True))
    return lookup


def pair_keys(batch: dict) -> list[bytes]:
    """A digest per pair of a collated batch (rows `[chosen; rejected]`) of what its reference log-probs depend on:
    each row's tokens and completion mask, padding stripped."""
    attention_mask = batch["attention_mask"].bool().cpu()
    rows = [torch.cat([ids[mask], completion[mask]]) for ids, completion, mask in
            zip(batch["input_ids"].cpu(), batch["completion_mask"].cpu(), attention_mask, strict=True)]
    pairs = len(rows) // 2
    return [hashlib.sha1(b"".join(_bytes(row) for row in (chosen, rejected))).digest()
            for chosen, rejected in zip(rows[:pairs], rows[pairs:], strict=True)]


def _bytes(row: torch.Tensor) -> bytes:
    return len(row).to_bytes(8, "little") + row.to(torch.int64).numpy().tobytes()


class StepwiseReference(TrainerCallback):
    """Makes the policy the reference at each stage boundary, and holds that stage's recomputed reference log-probs
    (with `precompute_ref_log_probs`) for `with_stage_reference_logps`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.reference_logps: dict[bytes, tuple[float, float]] | None = None  # by `pair_keys`

    def on_train_begin(self, args, state, control, **kwargs):
        if args.sdpo_stages > state.max_steps:  # the stages' boundaries would fall together, or after the last step
            raise ValueError(
                f"`sdpo_stages={args.sdpo_stages}` (stepwise DPO) needs at least one optimizer step per stage, and "
                f"this run has {state.max_steps}: set `sdpo_stages` to at most {state.max_steps}, or train longer."
            )
        # `global_step` is the checkpoint's when resuming. At a boundary, the policy it holds is that stage's reference.
        boundaries = stage_boundaries(state.max_steps, args.sdpo_stages)
        if state.global_step in boundaries:
            self.start_stage()
        passed = [step for step in boundaries if step < state.global_step]
        if passed:
            raise ValueError(
                f"Resuming stepwise DPO (`sdpo_stages`) from step {state.global_step}, past the stage boundary at step "
                f"{passed[-1]}: that stage's reference (the policy at the boundary) is not in the checkpoint. Resume "
                "from a checkpoint of the first stage, or restart the run."
            )

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in stage_boundaries(state.max_steps, args.sdpo_stages):
            self.start_stage()

    def start_stage(self) -> None:
        trainer = self.trainer
        use_policy_as_reference(trainer.accelerator, trainer.model, trainer.ref_model)
        if trainer.precompute_ref_logps:
            self.reference_logps = recompute_reference_logps(trainer)

    def with_stage_reference_logps(self, inputs: dict, training: bool) -> dict:
        """`inputs` with the reference log-probs recomputed at the last stage boundary, if any. A pair missing from
        them is an error in training; in evaluation it comes from a dataset passed to `evaluate()`, which TRL
        precomputed then, with the current reference, so its values stay."""
        if self.reference_logps is None:
            return inputs
        chosen, rejected = inputs["ref_chosen_logps"].clone(), inputs["ref_rejected_logps"].clone()
        for index, key in enumerate(pair_keys(inputs)):
            if key in self.reference_logps:
                chosen[index], rejected[index] = self.reference_logps[key]
            elif training:
                raise TRLContractError(
                    "A training pair has no reference log-probs recomputed at the stepwise DPO stage boundary: the "
                    "batches no longer hold the tokens the train dataset was collated to."
                )
        return {**inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

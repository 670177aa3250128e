"""sDPO (Kim et al. 2024, "sDPO: Don't Use Your Data All at Once"): training in stages, each against the policy as
the previous stage left it.

`sdpo_stages=N` splits the run's optimizer steps into `N` equal stages (the data of each stage is the next part of
the shuffled dataset, so with at most one epoch the stages see disjoint data, as in the paper's partition). At each
stage boundary the current policy becomes the reference: a PEFT policy's adapter is copied into the `"ref"`
adapter TRL's reference forward uses; a separate reference model (the `ref_model` passed, or TRL's frozen copy under
full fine-tuning) is overwritten with the policy's weights. Any DPO-family `loss_type` works; one stage is plain
training.
"""

from accelerate.utils import is_peft_model
from transformers import TrainerCallback

from .sft_reference import keep_starting_adapter_as_reference


def stage_boundaries(max_steps: int, stages: int) -> list[int]:
    """The optimizer steps after which a new stage starts: `round(k * max_steps / stages)`, `k = 1 .. stages - 1`."""
    return [round(k * max_steps / stages) for k in range(1, stages)]


def check_stages_can_run(trainer) -> None:
    """Refuses, before training, the setups whose reference trl_ext cannot replace by the policy."""
    stages = trainer.args.sdpo_stages
    if trainer.precompute_ref_logps:
        raise ValueError(
            f"`sdpo_stages={stages}` replaces the reference at each stage, but `precompute_ref_log_probs=True` fixes "
            "the reference log-probs before training: set it to False."
        )
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise ValueError(f"`sdpo_stages={stages}` is not supported under FSDP or DeepSpeed, whose sharded weights it "
                         "cannot copy into the reference: use DDP.")
    if trainer.ref_model is not None and is_peft_model(trainer.model):
        raise ValueError(f"`sdpo_stages={stages}` with a PEFT policy uses its adapter as the next reference: do not "
                         "pass a separate `ref_model`.")


def use_policy_as_reference(trainer) -> None:
    """Makes the reference of the following steps the policy as it is now."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ref_model is None:
        keep_starting_adapter_as_reference(policy)
    else:
        trainer.accelerator.unwrap_model(trainer.ref_model).load_state_dict(policy.state_dict())


class StagewiseReference(TrainerCallback):
    """Replaces the reference by the policy at each stage boundary."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # `global_step` is the checkpoint's when resuming. At a boundary, the policy it holds is that stage's reference.
        boundaries = stage_boundaries(state.max_steps, args.sdpo_stages)
        if state.global_step in boundaries:
            use_policy_as_reference(self.trainer)
        passed = [step for step in boundaries if step < state.global_step]
        if passed:
            raise ValueError(
                f"Resuming sDPO from step {state.global_step}, past the stage boundary at step {passed[-1]}: that "
                "stage's reference (the policy at the boundary) is not in the checkpoint. Resume from a checkpoint of "
                "the first stage, or restart the run."
            )

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in stage_boundaries(state.max_steps, args.sdpo_stages):
            use_policy_as_reference(self.trainer)


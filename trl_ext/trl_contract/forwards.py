"""The fused-LM-head forwards TRL's trainers run, as trl_ext records them: hooks that hand over their outputs (and
their backbones' last hidden states) with the autograd graph, and the check that they are the forwards expected."""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import transformers
import trl
from accelerate import Accelerator
from trl.trainer.utils import FusedCausalLMOutput

from .versions import supported_ranges


@contextlib.contextmanager
def record_fused_outputs(
    accelerator: Accelerator, *models: torch.nn.Module
) -> Iterator[list[FusedCausalLMOutput]]:
    """Collects, in call order, the `FusedCausalLMOutput` of every forward of `models` while the context is open.

    TRL's trainers call `model(..., fused_lm_head=True)` inside private loss code and keep the per-token log-probs to
    themselves; a forward hook hands trl_ext the same tensors, with their autograd graph, at no extra cost. Each model
    is hooked once, on its innermost module: DDP, DeepSpeed and FSDP wrappers call that module (FSDP2 patches it in
    place), so every forward is recorded exactly once whichever of a wrapper or its module TRL calls.
    """
    outputs: list[FusedCausalLMOutput] = []

    def record(module, args, output):
        if isinstance(output, FusedCausalLMOutput):
            outputs.append(output)

    with _forward_hooks([accelerator.unwrap_model(model) for model in models], record):
        yield outputs


def lm_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module a fused forward runs before its LM head: the causal LM's `base_model` (TRL's `add_fused_lm_head`
    calls `getattr(self, "base_model")` under transformers 5), inside a PEFT wrapper if there is one."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.base_model


@contextlib.contextmanager
def record_last_hidden_states(accelerator: Accelerator, *models: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects, in call order, the `last_hidden_state` `(B, L, H)` of every backbone forward of `models` (with its
    autograd graph), as [`record_fused_outputs`] collects the fused outputs of the same forwards."""
    hidden_states: list[torch.Tensor] = []

    def record(module, args, output):
        hidden_states.append(output.last_hidden_state)

    with _forward_hooks([lm_backbone(accelerator.unwrap_model(model)) for model in models], record):
        yield hidden_states


@contextlib.contextmanager
def _forward_hooks(modules: list[torch.nn.Module], hook) -> Iterator[None]:
    """`hook` on the forward of each distinct module of `modules` while the context is open."""
    distinct = {id(module): module for module in modules}
    handles = [module.register_forward_hook(hook) for module in distinct.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class ExpectedForward:
    """One fused forward trl_ext expects TRL to run: its role, rows, label positions, and whether it has gradient."""

    role: str
    rows: int
    positions: int  # `log_probs.size(1)` may exceed it (prompt-learning PEFT's virtual tokens), never fall short
    requires_grad: bool


class TRLContractError(RuntimeError):
    """TRL did not run the forwards trl_ext records its losses from; computing on them would give wrong numbers."""


def check_recorded_forwards(
    caller: str, recorded: list[FusedCausalLMOutput], expected: list[ExpectedForward]
) -> None:
    """Raises a `TRLContractError` naming what differs if `recorded` is not the `expected` sequence of forwards."""

    def fail(what: str) -> None:
        raise TRLContractError(
            f"{caller} was expected to run {len(expected)} fused forward(s) "
            f"({', '.join(forward.role for forward in expected)}), but {what}. trl_ext records its losses from these "
            f"forwards and stops rather than compute on the wrong tensors. Installed: trl {trl.__version__}, "
            f"transformers {transformers.__version__}; supported: {supported_ranges()}."
        )

    if len(recorded) != len(expected):
        fail(f"ran {len(recorded)}")
    for index, (output, forward) in enumerate(zip(recorded, expected, strict=True)):
        log_probs = output.log_probs
        where = f"forward {index + 1} ({forward.role})"
        if log_probs is None or log_probs.dim() != 2:
            fail(f"{where} returned no `(batch, positions)` log-probs")
        if log_probs.size(0) != forward.rows or log_probs.size(1) < forward.positions:
            fail(f"{where} has log-probs of shape {tuple(log_probs.shape)}, expected ({forward.rows}, "
                 f">= {forward.positions})")
        if log_probs.requires_grad != forward.requires_grad:
            fail(f"{where} {'has' if log_probs.requires_grad else 'has no'} gradient")

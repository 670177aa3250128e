"""Reusing the fused-LM-head forwards TRL's trainers already run, instead of running them again."""

import contextlib
from collections.abc import Iterator

import torch
from trl.trainer.utils import FusedCausalLMOutput


@contextlib.contextmanager
def record_fused_outputs(*modules: torch.nn.Module) -> Iterator[list[FusedCausalLMOutput]]:
    """Collects, in call order, every `FusedCausalLMOutput` the given modules return while the context is open.

    TRL's trainers call `model(..., fused_lm_head=True)` inside private loss code and keep the per-token log-probs
    to themselves; a forward hook hands trl_ext the same tensors, with their autograd graph, at no extra cost.
    Hook the unwrapped modules: DDP and DeepSpeed wrappers call them, so their hooks fire either way.
    """
    outputs: list[FusedCausalLMOutput] = []

    def record(module, args, output):
        if isinstance(output, FusedCausalLMOutput):
            outputs.append(output)

    handles = [module.register_forward_hook(record) for module in set(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()

"""Saving and resuming under FSDP, where transformers' own `save_model` and resume fall short for PEFT models."""

import contextlib
import logging
import os
from collections.abc import Iterator

import safetensors
import safetensors.torch
import torch
from accelerate.utils import is_peft_model
from peft import set_peft_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

from ..trl_contract import full_state_dict_while_saving

logger = logging.getLogger(__name__)
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # what PEFT's `save_pretrained` writes
# The attributes torch's FSDP1 and activation-checkpoint wrappers hold the wrapped module by: the segments their module
# names gain, which the state dicts they produce leave out
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class SavesLoadableModels:
    """Mixin for a transformers `Trainer` under FSDP.

    - `save_model` writes a PEFT model's adapter (`adapter_config.json` and its weights, gathered on the main process)
      whatever the FSDP state dict type, at the end of training and in each checkpoint. transformers writes it only
      with `FULL_STATE_DICT`: a `SHARDED_STATE_DICT` run otherwise ends with shards that no `from_pretrained` loads.
      The checkpoint shards that resume training are written as before. A full model is not gathered (it may not fit
      the main process's memory); its final save under `SHARDED_STATE_DICT` says where the weights are instead.
    - Under FSDP1, PEFT sees the model's modules by their unwrapped names while it picks the adapter's weights out of
      the gathered state dict. transformers wraps each LoRA layer in an FSDP unit of its own, and PEFT (0.21) strips
      only a leading wrapper from module names: it would pick nothing and write an adapter without weights.
      An adapter file without weights is refused when written.
    - Resuming an FSDP1-wrapped PEFT model restores its adapter from the checkpoint's adapter file, one FSDP unit at a
      time: accelerate's own restore there finds none of the adapter's weights, silently.
    """

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if plugin is None or plugin.state_dict_type == StateDictType.FULL_STATE_DICT:
            return super().save_model(output_dir, _internal_call)
        if is_peft_model(self.accelerator.unwrap_model(self.model)):
            with full_state_dict_while_saving(plugin):
                return super().save_model(output_dir, _internal_call)
        if not _internal_call:
            logger.warning(
                "save_model wrote no weights to %s: under FSDP with `fsdp_state_dict_type: %s` the full model exists "
                "only as the shards of each checkpoint (`<checkpoint>/pytorch_model_fsdp_0`). Merge them with "
                "`accelerate merge-weights`, or set `fsdp_state_dict_type: FULL_STATE_DICT` in the accelerate config.",
                output_dir or self.args.output_dir, plugin.state_dict_type.name)
        return super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not (isinstance(self.model, FullyShardedDataParallel) and is_peft_model(unwrapped)):
            return super()._save(output_dir, state_dict)
        with module_names_as_unwrapped(unwrapped):
            super()._save(output_dir, state_dict)
        if self.args.should_save:
            check_adapter_has_weights(os.path.join(output_dir or self.args.output_dir, ADAPTER_WEIGHTS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        adapter_file = os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS_FILE)
        if isinstance(model, FullyShardedDataParallel) and os.path.isfile(adapter_file):
            load_adapter_into_fsdp1(model, adapter_file)


def unwrapped_name(name: str) -> str:
    """A module's or tensor's name in the model without torch's FSDP1 and activation-checkpoint wrappers."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


@contextlib.contextmanager
def module_names_as_unwrapped(module: torch.nn.Module) -> Iterator[None]:
    """While it lasts, `module.named_modules()` (and so `named_parameters()`) yields the same modules under the names
    they have in the unwrapped model, which the keys of an FSDP1 state dict use."""
    def named_modules(*args, **kwargs):
        for name, submodule in type(module).named_modules(module, *args, **kwargs):
            yield unwrapped_name(name), submodule

    module.named_modules = named_modules
    try:
        yield
    finally:
        del module.named_modules


def check_adapter_has_weights(adapter_file: str) -> None:
    with safetensors.safe_open(adapter_file, framework="pt") as saved:
        if not list(saved.keys()):
            raise RuntimeError(f"PEFT wrote {adapter_file} without any weight: none of the adapter's module names "
                               "matched the keys of the state dict gathered from the model. Check that peft and torch "
                               "are releases trl_ext supports (listed in `trl_ext/requirements.txt`).")


def load_adapter_into_fsdp1(wrapper: FullyShardedDataParallel, adapter_file: str) -> None:
    """Loads a saved adapter into the PEFT model an FSDP1 `wrapper` shards, as a full state dict: FSDP gathers each unit
    while its weights load and writes them back to every process's shards."""
    weights = safetensors.torch.load_file(adapter_file)
    adapter_name = wrapper.active_adapter
    with FullyShardedDataParallel.state_dict_type(wrapper, StateDictType.FULL_STATE_DICT), \
            module_names_as_unwrapped(wrapper):
        result = set_peft_model_state_dict(wrapper, weights, adapter_name=adapter_name)
    unloaded = [name for name in map(unwrapped_name, result.missing_keys) if f".{adapter_name}." in name]
    if not weights or result.unexpected_keys or unloaded:
        raise RuntimeError(
            f"The adapter in {adapter_file} does not match the model: "
            + (f"{result.unexpected_keys[:3]} have no parameter" if result.unexpected_keys else
               f"{unloaded[:3]} are not in it" if unloaded else "it holds no weight")
            + ". Resume from a checkpoint of this run.")

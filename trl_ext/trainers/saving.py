"""Saving and resuming under FSDP, where transformers' own `save_model` and resume fall short for PEFT models."""

import logging
import os

import safetensors.torch
from accelerate.utils import is_peft_model
from peft import set_peft_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

from ..trl_contract import full_state_dict_while_saving

logger = logging.getLogger(__name__)
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # what PEFT's `save_pretrained` writes


class SavesLoadableModels:
    """Mixin for a transformers `Trainer` under FSDP.

    - `save_model` writes a PEFT model's adapter (`adapter_config.json` and its weights, gathered on the main process)
      whatever the FSDP state dict type, at the end of training and in each checkpoint. transformers writes it only
      with `FULL_STATE_DICT`: a `SHARDED_STATE_DICT` run otherwise ends with shards that no `from_pretrained` loads.
      The checkpoint shards that resume training are written as before. A full model is not gathered (it may not fit
      the main process's memory); its final save under `SHARDED_STATE_DICT` says where the weights are instead.
    - Resuming an FSDP1-wrapped PEFT model restores its adapter from the checkpoint's adapter file: accelerate loads
      it into the FSDP1 wrapper through PEFT, whose key mapping misses every adapter weight there, silently.
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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        adapter_file = os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS_FILE)
        if isinstance(model, FullyShardedDataParallel) and os.path.isfile(adapter_file):
            load_adapter_into_fsdp1(model, self.accelerator.unwrap_model(model), adapter_file)


def load_adapter_into_fsdp1(wrapper: FullyShardedDataParallel, peft_model, adapter_file: str) -> None:
    """Loads a saved adapter into the PEFT model an FSDP1 `wrapper` shards: on the gathered parameters, written back
    to every process's shards."""
    weights = safetensors.torch.load_file(adapter_file)
    with FullyShardedDataParallel.summon_full_params(wrapper, writeback=True):
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=peft_model.active_adapter)
    if result.unexpected_keys:
        raise RuntimeError(f"The adapter in {adapter_file} does not match the model: {result.unexpected_keys[:3]} "
                           "and more have no parameter. Resume from a checkpoint of this run.")

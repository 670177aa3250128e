"""trl_ext's losses under the wrappers accelerate applies: each forward recorded exactly once.

Under FSDP, transformers sets `trainer.model` to the FSDP wrapper, and TRL calls it for the PEFT reference while the
policy goes through `model`: hooks on both a wrapper and its module would record one forward twice. torch's FSDP runs
on CPU in a one-process gloo group, which is enough to check the recording (`accelerate launch` refuses FSDP without
a GPU). DDP is covered end to end by the 2-process tests in `test_recipes.py` and `test_llama2_pipeline.py`.
"""

import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

from trl_ext import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl_ext.trl_contract import record_fused_outputs

from .conftest import LORA, make_config


@pytest.fixture(scope="module")
def gloo_group():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def wrap(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    if kind == "fsdp1":
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    for layer in model.base_model.model.model.layers if hasattr(model, "peft_config") else model.model.layers:
        fully_shard(layer)
    return fully_shard(model)  # FSDP2 changes the module's class in place and returns it


def losses_and_metrics(trainer, model, batch) -> tuple[float, dict[str, float]]:
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, batch).item()
    # `num_tokens` counts every token trained on so far, so it differs between two calls by design
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items() if key != "num_tokens"}


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_record_a_wrapped_model_once(gloo_group, tiny_model_dir, preference_dataset, tmp_path, kind):
    trainer = DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path, loss_type="dpop"),
                         train_dataset=preference_dataset)
    module = trainer.model
    wrapper = wrap(kind, module)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    forward = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with record_fused_outputs(trainer.accelerator, wrapper, module) as recorded:
        wrapper(**forward, labels=batch["input_ids"], fused_lm_head=True)
        module(**forward, labels=batch["input_ids"], fused_lm_head=True)
    assert len(recorded) == 2  # one per forward, whichever of the wrapper or the module is called


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("loss", ["dpop", "kl_sft"])
def test_losses_under_fsdp_equal_the_unwrapped_ones(gloo_group, tiny_model_dir, preference_dataset, tmp_path, kind,
                                                    loss):
    """As transformers does under FSDP, `trainer.model` becomes the wrapper; the PEFT reference runs through it."""
    if loss == "dpop":
        trainer = DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path, loss_type="dpop"),
                             train_dataset=preference_dataset, peft_config=LORA)
    else:
        trainer = SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path, loss_type=loss, kl_coef=1.0),
                             train_dataset=preference_dataset, peft_config=LORA)
    trainer.model.train()
    with torch.no_grad():  # move the adapter away from zero, so that the policy differs from the reference
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    unwrapped = losses_and_metrics(trainer, trainer.model, batch)

    trainer.model = trainer.model_wrapped = wrap(kind, trainer.model)
    wrapped = losses_and_metrics(trainer, trainer.model, batch)
    assert wrapped[0] == pytest.approx(unwrapped[0], rel=1e-5)
    assert wrapped[1] == pytest.approx(unwrapped[1], rel=1e-4, abs=1e-7)
    penalty = {"dpop": "dpop/penalty", "kl_sft": "kl/penalty", "ift": "ift/nll_mixed"}[loss]
    assert penalty in wrapped[1]
    if loss == "kl_sft":
        assert wrapped[1]["kl/penalty"] > 0  # the reference (adapter disabled) differs from the policy


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_ift_refuses_sharded_parameters(gloo_group, tiny_model_dir, preference_dataset, tmp_path, kind):
    """IFT's first pass reads the embedding matrix outside the forward, where FSDP keeps it sharded."""
    trainer = SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path, loss_type="ift"),
                         train_dataset=preference_dataset)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    trainer.model = trainer.model_wrapped = wrap(kind, trainer.model)
    with pytest.raises(ValueError, match=r"`loss_type='ift'` does not support FSDP or DeepSpeed ZeRO-3.*Use DDP"):
        trainer.compute_loss(trainer.model, batch)

"""trl_ext's losses under the wrappers accelerate applies: each forward recorded exactly once.

Under FSDP, transformers sets `trainer.model` to the FSDP wrapper, and TRL calls it for the PEFT reference while the
policy goes through `model`: hooks on both a wrapper and its module would record one forward twice. torch's FSDP runs
on CPU in a one-process gloo group, which is enough to check the recording (`accelerate launch` refuses FSDP without
a GPU). DDP is covered end to end by the 2-process tests in `test_recipes.py` and `test_llama2_pipeline.py`. The
trainers here run on the CPU (`use_cpu`) on a GPU machine too: a gloo group holds CPU tensors.
"""

import contextlib

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import transformers
from accelerate import FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from datasets import Dataset
from peft import AutoPeftModelForCausalLM
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType, fully_shard
from transformers import AutoModelForCausalLM

from trl_ext import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl_ext.trainers.saving import check_adapter_has_weights, load_adapter_into_fsdp1
from trl_ext.trl_contract import add_fused_lm_head, record_fused_outputs

from .conftest import LORA, free_port, make_config


@pytest.fixture
def gloo_group():
    """A one-process gloo group, and accelerate's process-wide state started afresh on the CPU (and again after the
    test): an earlier test on a GPU machine leaves it on `cuda:0`, which a CPU trainer may not share."""
    AcceleratorState._reset_state(reset_partial_state=True)
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)


def cpu_config(config_cls, tmp_path, **fields):
    return make_config(config_cls, tmp_path, use_cpu=True, **fields)


def wrap(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    """FSDP1 as `accelerate_configs/fsdp.yaml` sets it up (flat parameters: `use_orig_params: false`), with the
    auto-wrap policy transformers installs for a PEFT model (each LoRA layer and decoder layer a unit of its own);
    FSDP2 with each decoder layer a unit of its own."""
    is_peft = hasattr(model, "peft_config")
    if kind == "fsdp1":
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=False,
                                        auto_wrap_policy=fsdp_auto_wrap_policy(model) if is_peft else None)
    for layer in model.base_model.model.model.layers if is_peft else model.model.layers:
        fully_shard(layer)
    return fully_shard(model)  # FSDP2 changes the module's class in place and returns it


def losses_and_metrics(trainer, model, batch) -> tuple[float, dict[str, float]]:
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, batch).item()
    # `num_tokens` counts every token trained on so far, so it differs between two calls by design
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items() if key != "num_tokens"}


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_record_a_wrapped_model_once(gloo_group, tiny_model_dir, preference_dataset, tmp_path, kind):
    trainer = DPOTrainer(model=tiny_model_dir, args=cpu_config(DPOConfig, tmp_path, loss_type="dpop"),
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
        trainer = DPOTrainer(model=tiny_model_dir, args=cpu_config(DPOConfig, tmp_path, loss_type="dpop"),
                             train_dataset=preference_dataset, peft_config=LORA)
    else:
        trainer = SFTTrainer(model=tiny_model_dir, args=cpu_config(SFTConfig, tmp_path, loss_type=loss, kl_coef=1.0),
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
def test_prefix_sharing_under_fsdp_equals_the_unwrapped_step(gloo_group, tiny_model_dir, preference_dataset, tmp_path,
                                                            kind):
    """Full fine-tuning with a separate reference, which TRL wraps under FSDP before trl_ext first checks it: no probe
    runs through the bare module (only the wrapper may run it), and the shared step's loss and metrics equal those of
    the unwrapped models."""
    trainer = DPOTrainer(model=tiny_model_dir, ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         args=cpu_config(DPOConfig, tmp_path, loss_type="dpop", prefix_sharing=True),
                         train_dataset=preference_dataset)
    trainer.model.train()
    with torch.no_grad():  # the policy moves away from the reference
        for parameter in trainer.model.parameters():
            parameter.add_(0.01)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    unwrapped = losses_and_metrics(trainer, trainer.model, batch)

    run_under_fsdp(trainer, kind, "FULL_STATE_DICT")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(reference)
    trainer.ref_model = wrap(kind, reference)  # as TRL's `__init__` does
    wrapped = losses_and_metrics(trainer, trainer.model, batch)
    assert wrapped[0] == pytest.approx(unwrapped[0], rel=1e-5)
    assert wrapped[1] == pytest.approx(unwrapped[1], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_ift_refuses_sharded_parameters(gloo_group, tiny_model_dir, preference_dataset, tmp_path, kind):
    """IFT's first pass reads the embedding matrix outside the forward, where FSDP keeps it sharded."""
    trainer = SFTTrainer(model=tiny_model_dir, args=cpu_config(SFTConfig, tmp_path, loss_type="ift"),
                         train_dataset=preference_dataset)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    trainer.model = trainer.model_wrapped = wrap(kind, trainer.model)
    with pytest.raises(ValueError, match=r"`loss_type='ift'` does not support FSDP or DeepSpeed ZeRO-3.*Use DDP"):
        trainer.compute_loss(trainer.model, batch)


def run_under_fsdp(trainer, kind: str, state_dict_type: str) -> FullyShardedDataParallelPlugin:
    """What `accelerate launch` with an FSDP config sets up (and refuses without a GPU): the wrapped model and the
    FSDP plugin with the config's state dict type."""
    trainer.model = trainer.model_wrapped = wrap(kind, trainer.model)
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=int(kind[-1]), state_dict_type=state_dict_type)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    return state.fsdp_plugin


def trained_adapter(trainer) -> dict[str, torch.Tensor]:
    """Moves the LoRA weights away from their initialisation, as training would; returns them by parameter name."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters() if "lora_" in name}


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """The LoRA weights of `model`, gathered if it is FSDP-wrapped, by their name in the bare PEFT model."""
    gathered = FullyShardedDataParallel.summon_full_params(model) if isinstance(model, FullyShardedDataParallel) \
        else contextlib.nullcontext()
    with gathered:
        return {name.replace("_fsdp_wrapped_module.", ""): getattr(parameter, "full_tensor", parameter.detach)()
                .detach().clone() for name, parameter in model.named_parameters() if "lora_" in name}


def peft_trainer(family: str, tiny_model_dir, dataset, tmp_path, **fields):
    if family == "dpo":
        return DPOTrainer(model=tiny_model_dir, args=cpu_config(DPOConfig, tmp_path, loss_type="dpop", **fields),
                          train_dataset=dataset, peft_config=LORA)
    return SFTTrainer(model=tiny_model_dir, args=cpu_config(SFTConfig, tmp_path, loss_type="kl_sft", **fields),
                      train_dataset=dataset, peft_config=LORA)


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("family", ["dpo", "sft"])
def test_save_model_under_sharded_fsdp_writes_a_loadable_adapter(gloo_group, tiny_model_dir, preference_dataset,
                                                                 tmp_path, kind, family):
    trainer = peft_trainer(family, tiny_model_dir, preference_dataset, tmp_path)
    trained = trained_adapter(trainer)
    plugin = run_under_fsdp(trainer, kind, "SHARDED_STATE_DICT")

    transformers.Trainer.save_model(trainer, str(tmp_path / "transformers"))
    assert not (tmp_path / "transformers" / "adapter_config.json").exists()  # what trl_ext's override is for
    trainer.save_model(str(tmp_path / "adapter"))
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT  # checkpoint shards keep the run's type
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert adapter_weights(loaded).keys() == trained.keys()
    for name, weight in adapter_weights(loaded).items():
        torch.testing.assert_close(weight, trained[name], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_a_checkpoint_under_fsdp_holds_the_adapter_and_resumes_it(gloo_group, tiny_model_dir, preference_dataset,
                                                                  tmp_path, kind, state_dict_type):
    trainer = peft_trainer("dpo", tiny_model_dir, preference_dataset, tmp_path, save_strategy="steps")
    trained = trained_adapter(trainer)
    run_under_fsdp(trainer, kind, state_dict_type)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.state.global_step = 1
    trainer._save_checkpoint(trainer.model, trial=None)
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "adapter_config.json").is_file()

    with torch.no_grad():  # the adapter moves on after the checkpoint
        for name, parameter in trainer.model.named_parameters():
            if "lora_" in name:
                parameter.add_(1.0)
    trainer._load_from_checkpoint(str(checkpoint), trainer.model_wrapped)
    resumed = adapter_weights(trainer.model)
    assert resumed.keys() == trained.keys()
    for name, weight in resumed.items():
        torch.testing.assert_close(weight, trained[name], rtol=0, atol=0)



def resume_on_two_processes(rank: int, port: int, model_dir: str, output_dir: str, dataset_rows: dict):
    """One of two gloo processes: a PEFT DPO trainer's adapter saved by PEFT, the model wrapped by FSDP1 with its
    parameters sharded between the two (`FULL_SHARD`), the adapter moved on, then restored from the saved file. Each
    process writes the adapter it then holds. (Saving under `FULL_SHARD` is not run here: accelerate gathers the
    state dict with `offload_to_cpu`, which FSDP1 supports only for parameters on an accelerator.)"""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = peft_trainer("dpo", model_dir, Dataset.from_dict(dataset_rows), output_dir)
    trained_adapter(trainer)
    if rank == 0:
        trainer.model.save_pretrained(f"{output_dir}/adapter")
    dist.barrier()
    run_under_fsdp(trainer, "fsdp1", "SHARDED_STATE_DICT")
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)
    load_adapter_into_fsdp1(trainer.model, f"{output_dir}/adapter/adapter_model.safetensors")
    torch.save(adapter_weights(trainer.model), f"{output_dir}/resumed-{rank}.pt")
    dist.destroy_process_group()


def test_an_adapter_sharded_between_two_processes_is_restored(tiny_model_dir, preference_dataset, tmp_path):
    port = free_port()
    torch.multiprocessing.spawn(resume_on_two_processes, nprocs=2,
                                args=(port, tiny_model_dir, str(tmp_path), preference_dataset.to_dict()))
    saved = adapter_weights(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter"))
    assert len(saved) == 8  # q and v, A and B, 2 layers
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"resumed-{rank}.pt")
        assert resumed.keys() == saved.keys()
        for name, weight in resumed.items():
            torch.testing.assert_close(weight, saved[name], rtol=0, atol=0)


def test_an_adapter_file_without_weights_is_refused(tmp_path):
    empty = tmp_path / "adapter_model.safetensors"
    safetensors.torch.save_file({}, empty)
    with pytest.raises(RuntimeError, match=r"PEFT wrote .*adapter_model.safetensors without any weight"):
        check_adapter_has_weights(str(empty))

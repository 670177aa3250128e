"""TRL's and transformers' internals trl_ext reaches: the private methods it overrides (checked at import), and one
named function for each private attribute it reads or writes, or behaviour it depends on."""

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import transformers
import trl
from torch.distributed.fsdp import StateDictType
from transformers.integrations import TensorBoardCallback, TrackioCallback, WandbCallback
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from .versions import supported_ranges

# The helpers trl_ext calls. `trl.experimental` promises no stability (hence its warning, silenced here: the contract
# tests guard what trl_ext uses of it); the others are undocumented utilities.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*trl.experimental")
    from trl.experimental.utils import create_reference_model  # noqa: F401  (a frozen copy of the policy)
from trl.models.utils import (
    disable_gradient_checkpointing,  # noqa: F401  (no-grad passes under checkpointing)
    unwrap_model_for_generation,  # noqa: F401  (generation from DDP/ZeRO-3-wrapped models)
)
from trl.scripts.env import print_env as print_trl_env  # noqa: F401  (what `trl env` prints)
from trl.trainer.utils import (  # noqa: F401
    FusedCausalLMOutput,  # what a forward with `fused_lm_head=True` returns
    add_fused_lm_head,  # patches `forward` to take `fused_lm_head=True`
    get_config_model_id,  # the default `output_dir` name, as TRL's trainers build it
    hash_module,  # the hash of a model's weights in the cache key of precomputed reference log-probs
    use_adapter,  # activates a named PEFT adapter (`None`: adapters disabled) for one forward
)

# The loss types `trl.DPOTrainer` computes itself; trl_ext passes these through untouched. TRL lists them only in
# `_compute_loss`'s error message, which a contract test compares with this tuple.
TRL_DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# The metrics `trl.DPOTrainer._compute_loss` logs from the chosen completions (`entropy` from both): meaningless when
# the chosen completion is trl_ext's empty placeholder, so they are dropped then.
TRL_DPO_CHOSEN_METRICS = ("entropy", "logits/chosen", "mean_token_accuracy", "rewards/chosen", "rewards/accuracies",
                          "rewards/margins", "logps/chosen")
# `trl.SFTConfig.loss_type`'s argparse choices (`chunked_nll` is a deprecated alias TRL maps to `nll`)
TRL_SFT_LOSS_CHOICES = tuple(trl.SFTConfig.__dataclass_fields__["loss_type"].metadata["choices"])
TRL_SFT_LOSS_TYPES = ("nll", "dft")


@dataclass(frozen=True)
class PrivateMethod:
    """A private method trl_ext overrides or calls: if TRL renames it, an override would silently never run."""

    owner: type
    name: str
    parameters: tuple[str, ...]

    def problem(self) -> str | None:
        method = getattr(self.owner, self.name, None)
        if method is None:
            return f"`{self.owner.__qualname__}.{self.name}` no longer exists"
        parameters = tuple(inspect.signature(method).parameters)
        if parameters != self.parameters:
            return f"`{self.owner.__qualname__}.{self.name}{parameters}` now takes {parameters}, not {self.parameters}"
        return None


PRIVATE_METHODS = (
    # trl_ext.DPOTrainer computes its losses around TRL's private loss, and checks datasets before TRL prepares them
    PrivateMethod(trl.DPOTrainer, "_compute_loss", ("self", "model", "inputs", "return_outputs")),
    PrivateMethod(trl.DPOTrainer, "_prepare_dataset", ("self", "dataset", "processing_class", "args", "dataset_name")),
    # ...overrides the reference precompute (to keep 4-bit layers differentiable first) and, in stepwise DPO, runs it
    # again at each stage boundary, after setting the model hash of its cache key (`_precompute_model_hash`)
    PrivateMethod(trl.DPOTrainer, "_precompute_ref_logps", ("self", "dataset", "name", "batch_size")),
    # trl_ext.SFTTrainer maps preference datasets to completions before TRL prepares them. Both trainers count the
    # rows TRL's preparation drops (those truncation leaves no completion token) and the empty completions of the
    # rows it keeps, in order, with their text columns (EOS appended) beside the token ids (`trl_ext.data_checks`)
    PrivateMethod(trl.SFTTrainer, "_prepare_dataset",
                  ("self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name")),
    # ...keeps its precomputed reference column through transformers' column pruning (`_signature_columns`)
    PrivateMethod(transformers.Trainer, "_set_signature_columns_if_needed", ("self",)),
    # ...and moves the batches of its reference precompute to the device as the Trainer does
    PrivateMethod(transformers.Trainer, "_prepare_inputs", ("self", "inputs")),
    # trl_ext.DPOTrainer saves and restores its stateful losses' state next to the optimizer's in each checkpoint
    PrivateMethod(transformers.Trainer, "_save_optimizer_and_scheduler", ("self", "output_dir")),
    PrivateMethod(transformers.Trainer, "_load_optimizer_and_scheduler", ("self", "checkpoint")),
    # Both trainers restore an FSDP1-wrapped PEFT model's adapter after transformers loads a checkpoint...
    PrivateMethod(transformers.Trainer, "_load_from_checkpoint", ("self", "resume_from_checkpoint", "model")),
    # ...and have PEFT pick the adapter out of the state dict `save_model` gathers, which `_save` hands to the
    # unwrapped model's `save_pretrained`, by the names of the unwrapped model
    PrivateMethod(transformers.Trainer, "_save", ("self", "output_dir", "state_dict")),
)
# Both trainers cite the papers of the losses they trained through `_paper`, the dictionary TRL's
# `create_model_card` reads (keys `title`, `id`, `citation`) and each TRL trainer class sets.
MODEL_CARD_PAPER_KEYS = ("title", "id", "citation")


def metric_mode(trainer: transformers.Trainer) -> str:
    """Which of TRL's metric stores a step logs to: `"train"` while the model trains, else `"eval"`."""
    return "train" if trainer.model.training else "eval"


def log_metric(trainer: transformers.Trainer, key: str, value: float) -> None:
    """Adds `value` to the metrics TRL's trainers log at the next `log` (`_metrics`: the mean of each key's list)."""
    trainer._metrics[metric_mode(trainer)][key].append(value)


def drop_metrics(trainer: transformers.Trainer, keys: tuple[str, ...]) -> None:
    """Removes `keys` from the metrics TRL's trainer is about to log for this step."""
    for key in keys:
        trainer._metrics[metric_mode(trainer)].pop(key, None)


def log_without_flushing_metrics(trainer: transformers.Trainer, logs: dict[str, float]) -> None:
    """Logs `logs` through transformers' `Trainer.log`, stepping past TRL's override, which flushes its buffered
    training metrics into every log call (splitting their averaging window). Keeps `control.should_log`, which a log
    clears and this step's training log may still need."""
    should_log = trainer.control.should_log
    transformers.Trainer.log(trainer, logs)
    trainer.control.should_log = should_log


def log_sample_table(trainer: transformers.Trainer, key: str, columns: list[str], rows: list[list], step: int) -> None:
    """Logs a table under `key` to the trackers of `trainer` that show one: a table to W&B and trackio, markdown text
    to TensorBoard (through transformers' callbacks' private handles on their clients)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, WandbCallback) and callback._wandb.run is not None:
            callback._wandb.log({key: callback._wandb.Table(columns=columns, data=rows)})
        elif isinstance(callback, TrackioCallback) and callback._initialized:
            callback._trackio.log({key: callback._trackio.Table(columns=columns, data=rows)})
        elif isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            table = "\n".join([f"| {' | '.join(columns)} |", "|" + " --- |" * len(columns)]
                              + ["| " + " | ".join(repr(cell) if isinstance(cell, str) else str(cell) for cell in row)
                                 + " |" for row in rows])
            callback.tb_writer.add_text(key, table, step)


def prepare_inputs(trainer: transformers.Trainer, batch: dict) -> dict:
    """`batch` on the trainer's device, as the Trainer prepares every batch it steps on (`_prepare_inputs`)."""
    return trainer._prepare_inputs(batch)


def keep_signature_column(trainer: transformers.Trainer, column: str) -> None:
    """Keeps `column` through transformers' pruning of the dataset columns the model's forward does not take
    (`_signature_columns`); call it from an override of `_set_signature_columns_if_needed`, after the original."""
    if column not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, column]


def precompute_ref_logps_again(trainer: trl.DPOTrainer, reference: torch.nn.Module, datasets) -> list:
    """Runs TRL's precompute of the reference log-probs (`_precompute_ref_logps`) over `(dataset, name, batch_size)`
    triples with `reference`'s weights, after keying TRL's on-disk cache on them (`_precompute_model_hash`): the key
    is the hash of the weights taken at init, so the cache would otherwise return the old reference's values."""
    trainer._precompute_model_hash = hash_module(reference)
    return [trainer._precompute_ref_logps(dataset, name, batch_size) for dataset, name, batch_size in datasets]


def model_card_paper_of_class(trainer_class: type) -> dict:
    """The paper a TRL trainer class cites in its model card (`_paper`)."""
    return trainer_class._paper


def set_model_card_paper(trainer: transformers.Trainer, paper: dict) -> None:
    """Makes `trainer`'s next model card cite `paper` (keys `MODEL_CARD_PAPER_KEYS`) instead of its class's."""
    trainer._paper = paper


def check_private_methods() -> None:
    problems = [problem for method in PRIVATE_METHODS if (problem := method.problem()) is not None]
    if problems:
        raise ImportError(
            f"trl_ext cannot work with trl {trl.__version__} / transformers {transformers.__version__}: "
            + "; ".join(problems) + f". Supported: {supported_ranges()}."
        )


def default_bf16_to_what_the_machine_supports(args) -> None:
    """TRL's configs turn `bf16=None` into `True`, which transformers then refuses on a machine without bf16 support;
    leave an unset `bf16` off there, so the same script runs on a CPU. An explicit `bf16=True` is left to fail."""
    if args.bf16 is None and not args.fp16 and not args.use_cpu:
        if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
            args.bf16 = False


@contextlib.contextmanager
def full_state_dict_while_saving(fsdp_plugin) -> Iterator[None]:
    """Makes transformers' `Trainer.save_model` write the model under FSDP, whatever the run's state dict type.

    `save_model` writes nothing under FSDP unless `fsdp_plugin.state_dict_type` is `FULL_STATE_DICT` (the weights of a
    `SHARDED_STATE_DICT` run exist only as checkpoint shards); it then gathers the whole state dict on the main process
    through `accelerator.get_state_dict`, which does not read the plugin's type. PEFT's FSDP guide switches the type
    before the final save; here it is switched back afterwards, so the checkpoint shards that resume a run (written
    after `save_model` in `_save_checkpoint`) keep the run's type.
    """
    previous = fsdp_plugin.state_dict_type
    fsdp_plugin.state_dict_type = StateDictType.FULL_STATE_DICT
    try:
        yield
    finally:
        fsdp_plugin.state_dict_type = previous


@contextlib.contextmanager
def trl_sft_loss_type_while_constructing(args: trl.SFTConfig) -> Iterator[None]:
    """Shows `trl.SFTTrainer.__init__`, which refuses any loss type but its own, `nll` while it runs; the user's value
    is restored. trl_ext's SFT losses start from TRL's NLL path, so `nll` is the truthful stand-in."""
    loss_type = args.loss_type
    if loss_type not in TRL_SFT_LOSS_TYPES:
        args.loss_type = "nll"
    try:
        yield
    finally:
        args.loss_type = loss_type


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """Keeps `model`'s bitsandbytes 4-bit layers on their differentiable kernel on the CPU.

    bitsandbytes repacks a 4-bit layer for a CPU inference kernel the first time the layer runs in eval mode without
    gradient on a CPU with AVX512-BF16 (`Linear4bit.support_avx512bf16_for_cpu`), as a reference precompute, an
    evaluation or a generation does; that kernel has no backward, so every later training forward silently drops the
    gradient through the layer's input. This turns the repacking off and undoes one already done.
    """
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def loss_is_scaled_for_gradient_accumulation(trainer: transformers.Trainer, num_items_in_batch) -> bool:
    """Whether `Trainer.training_step` leaves gradient accumulation to the loss instead of dividing it by the number of
    accumulation steps: the trainer's `loss_is_scaled_for_ga` where set (transformers reads it from 5.19 on; below,
    TRL's base trainer maps it onto the two attributes older releases read), else whether the loss is normalised by
    `num_items_in_batch`, by the model or by `compute_loss_func`."""
    if trainer.loss_is_scaled_for_ga is not None:
        return trainer.loss_is_scaled_for_ga
    scaled_by_num_items = trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
    return scaled_by_num_items or trainer.compute_loss_func is not None


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation `model` runs: `"sdpa"`, `"eager"`, `"flex_attention"`, `"flash_attention_2"`, ...
    (transformers keeps it in `config._attn_implementation`)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.config._attn_implementation

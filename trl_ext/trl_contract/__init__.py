"""Every TRL and transformers internal trl-ext relies on, named and checked in one place: the only door to them.

trl-ext subclasses TRL's trainers instead of forking them, so it leans on things TRL does not promise to keep: private
methods it overrides, private attributes it reads (each through one named function here), the layout of the
fused-LM-head forwards it records, helpers under `trl.experimental`. Importing `trl_ext` under a trl or transformers
release outside the range `trl_ext/requirements.txt` declares raises an error (set `TRL_EXT_ALLOW_UNSUPPORTED_TRL=1` to
go on at your own risk), and an overridden private method that changed shape raises at import whatever the version.
`tests/test_trl_contract.py` checks each assumption on its own, so an upgrade that breaks one fails there, by name;
`tests/test_one_door.py` fails on a private TRL or transformers name used anywhere else in the package.

- `versions.py`: the supported releases, checked at import
- `internals.py`: the private methods overridden, and the functions that reach private attributes and behaviours
- `forwards.py`: recording TRL's fused forwards, and checking them
"""

# The supported releases first: an unsupported one is refused before anything relies on its internals
from .versions import (
    ALLOW_UNSUPPORTED_ENV,
    CHECKED_AT_IMPORT,
    REQUIREMENTS_FILE,
    check_version,
    check_versions,
    declared_requirements,
    supported_ranges,
    supported_trl_requirement,
)

check_versions()

from .forwards import (  # noqa: E402
    ExpectedForward,
    TRLContractError,
    check_recorded_forwards,
    lm_backbone,
    record_fused_outputs,
    record_last_hidden_states,
)
from .internals import (  # noqa: E402
    MODEL_CARD_PAPER_KEYS,
    PRIVATE_METHODS,
    TRL_DPO_CHOSEN_METRICS,
    TRL_DPO_LOSS_TYPES,
    TRL_SFT_LOSS_CHOICES,
    TRL_SFT_LOSS_TYPES,
    FusedCausalLMOutput,
    PrivateMethod,
    add_fused_lm_head,
    attention_implementation,
    check_private_methods,
    create_reference_model,
    default_bf16_to_what_the_machine_supports,
    disable_gradient_checkpointing,
    drop_metrics,
    full_state_dict_while_saving,
    get_config_model_id,
    hash_module,
    keep_4bit_layers_differentiable,
    keep_signature_column,
    log_metric,
    log_sample_table,
    log_without_flushing_metrics,
    loss_is_scaled_for_gradient_accumulation,
    metric_mode,
    model_card_paper_of_class,
    precompute_ref_logps_again,
    prepare_inputs,
    print_trl_env,
    set_model_card_paper,
    trl_sft_loss_type_while_constructing,
    unwrap_model_for_generation,
    use_adapter,
)

__all__ = [
    "check_recorded_forwards",
    "ExpectedForward",
    "FusedCausalLMOutput",
    "lm_backbone",
    "record_fused_outputs",
    "record_last_hidden_states",
    "TRLContractError",
    "create_reference_model",
    "MODEL_CARD_PAPER_KEYS",
    "PRIVATE_METHODS",
    "TRL_DPO_CHOSEN_METRICS",
    "TRL_DPO_LOSS_TYPES",
    "TRL_SFT_LOSS_CHOICES",
    "TRL_SFT_LOSS_TYPES",
    "add_fused_lm_head",
    "attention_implementation",
    "check_private_methods",
    "default_bf16_to_what_the_machine_supports",
    "disable_gradient_checkpointing",
    "drop_metrics",
    "full_state_dict_while_saving",
    "get_config_model_id",
    "hash_module",
    "keep_4bit_layers_differentiable",
    "keep_signature_column",
    "log_metric",
    "log_sample_table",
    "log_without_flushing_metrics",
    "loss_is_scaled_for_gradient_accumulation",
    "metric_mode",
    "model_card_paper_of_class",
    "precompute_ref_logps_again",
    "prepare_inputs",
    "print_trl_env",
    "PrivateMethod",
    "set_model_card_paper",
    "trl_sft_loss_type_while_constructing",
    "unwrap_model_for_generation",
    "use_adapter",
    "ALLOW_UNSUPPORTED_ENV",
    "CHECKED_AT_IMPORT",
    "REQUIREMENTS_FILE",
    "check_version",
    "check_versions",
    "declared_requirements",
    "supported_ranges",
    "supported_trl_requirement",
]

# Checked at import: an override that silently never runs is the worst way for an upgrade to break trl_ext.
check_private_methods()

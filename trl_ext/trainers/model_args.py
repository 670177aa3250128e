"""What both trainers do with their `model` and `args` arguments before TRL's constructor sees them."""

from ..embedded import resolve_model_name
from ..paths import check_model_path
from ..trl_contract import get_config_model_id


def resolve_model_and_args(model, args, config_cls, suffix: str):
    """Resolves an embedded `model` name and, like TRL's trainers, defaults `args` to
    `config_cls("<model>-<suffix>")`."""
    if isinstance(model, str):
        check_model_path(model, "model")
        model = resolve_model_name(model)
    if args is None:
        model_name = model if isinstance(model, str) else get_config_model_id(model.config)
        args = config_cls(f"{model_name.split('/')[-1]}-{suffix}")
    return model, args

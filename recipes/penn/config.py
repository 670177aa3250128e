"""The Penn experiment's settings: its own arguments, the base model and adapter, and each method's training config.

A method's config is the real `trl_ext.SFTConfig`, `trl_ext.DPOConfig` or `trl.DPOConfig`, built from, in order:
`recipes/configs/penn/common.yaml`, the method's own file there (its trainer and loss), the file `--config` names
(top-level keys, then a `<method>:` section), then the command line (`--<field> value`, then `--<method>.<field>
value`). A field given without a method goes to the methods whose files in recipes/configs/penn/ set it (common.yaml
sets it for all), or, where none does, to every method whose config has the field: `--beta 0.2` is every DPO-family
method's beta, `--dpop_lambda 7` is DPOP's, `--warmup_steps 5` is everyone's, `--dpop.beta 0.3` is DPOP's alone.
A key or flag no config has is an error naming it, and so is a field its config refuses.
"""

import argparse
import re
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

import torch
import trl
import yaml
from trl import TrlParser

import trl_ext
from trl_ext.scripts.common import CommandParser, check_config_file

from .data import PENN_PATTERN

RECIPES = Path(__file__).parents[1]
CONFIGS = RECIPES / "configs" / "penn"
# The default run's methods, and the other DPO-family losses trl_ext adds (`--methods` picks any)
DEFAULT_METHODS = ("base", "sft", "kl_sft", "dpo", "dpop", "ift", "trl_dpo")
MORE_DPO_METHODS = ("cdpo", "rdpo", "beta_dpo", "npo", "tdpo1", "tdpo2", "sdpo")
METHODS = DEFAULT_METHODS + MORE_DPO_METHODS
TRAINED_METHODS = METHODS[1:]  # `base` is the untrained model
# A method file's `trainer`: the trainer class and its config class
TRAINERS = {
    "trl_ext.SFTTrainer": (trl_ext.SFTTrainer, trl_ext.SFTConfig),
    "trl_ext.DPOTrainer": (trl_ext.DPOTrainer, trl_ext.DPOConfig),
    "trl.DPOTrainer": (trl.DPOTrainer, trl.DPOConfig),
}
DEFAULT_DATA = str(RECIPES / "data" / "penn")


@dataclass
class PennArguments:
    """The experiment's own arguments: which methods, which data, where to, how to evaluate and judge."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={"help": f"Any of {METHODS}."})
    dataset_name: str = field(
        default=DEFAULT_DATA,
        metadata={"help": "A directory of train/test JSON(L) files, a JSON/JSONL file, or a hub dataset, with "
                          "`prompt`, `chosen`, `rejected` columns."},
    )
    dataset_test_split: str = field(default="test")
    test_size: int = field(default=125, metadata={"help": "Prompts held out when the dataset has no test split."})
    output_dir: str = field(default="outputs/penn")
    overwrite: bool = field(default=False, metadata={"help": "Redo methods whose results already exist."})
    quick: bool = field(default=False, metadata={
        "help": "A smoke test: 4 steps of each method on 32 pairs, 16 test prompts (about 30 minutes on 2 CPU cores "
                "for the default methods, 4 for one)."})
    seed: int = field(default=0, metadata={"help": "Data split, training and sampling seed of every method."})
    seeds: list[int] = field(default_factory=list, metadata={
        "help": "Repeat the whole comparison once per seed (into `output_dir/seed-<N>`, replacing `seed`) and report "
                "the mean and spread of every metric; empty: one run with `seed`."})
    # Evaluation
    target_pattern: str = field(default=PENN_PATTERN, metadata={"help": "Regex counted by alignment accuracy."})
    max_new_tokens: int = field(default=24)
    decoding: str = field(default="sample", metadata={"help": "`sample` (seeded) or `greedy`."})
    temperature: float = field(default=0.7)
    top_p: float = field(default=0.9)
    generation_batch_size: int = field(default=32)
    num_samples_in_report: int = field(default=3)
    curve_prompts: int = field(default=32, metadata={
        "help": "Held-out prompts generated from every `curve_every` steps for the alignment-accuracy curves, and "
                "whose pairs the DPO-family methods are evaluated on at those steps (`eval_rewards/*`); 0: neither."})
    curve_every: int = field(default=10, metadata={"help": "Optimizer steps between two points of the curves."})
    # Optional pairwise judge: an OpenAI-compatible chat endpoint
    judge_base_url: str | None = field(default=None, metadata={"help": "e.g. https://api.openai.com/v1; off if unset"})
    judge_model: str = field(default="gpt-4o")
    judge_api_key_env: str = field(default="OPENAI_API_KEY")
    judge_pairs: list[str] = field(default_factory=lambda: ["dpop:trl_dpo", "sft:dpop"])

    def __post_init__(self):
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown:
            raise ValueError(f"Unknown `methods` {unknown}. Valid values: {list(METHODS)}.")
        if self.decoding not in ("sample", "greedy"):
            raise ValueError(f"`decoding` must be 'sample' or 'greedy', got '{self.decoding}'.")
        for pair in self.judge_pairs:
            if len(pair.split(":")) != 2 or any(side not in METHODS for side in pair.split(":")):
                raise ValueError(f"`judge_pairs` entries look like 'dpop:trl_dpo' with methods of {list(METHODS)}.")
        re.compile(self.target_pattern)

    def generation_kwargs(self) -> dict:
        if self.decoding == "sample":
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        return {"do_sample": False}


@dataclass
class PennModelArguments:
    """The base model and the adapter every method trains, named as `trl.ModelConfig`'s fields (common.yaml sets
    them)."""

    model_name_or_path: str
    use_peft: bool = field(metadata={"help": "Train a LoRA adapter; false: all weights."})
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: list[str]


@dataclass
class PennSetup:
    """What `main` runs: the experiment's arguments, the model's, and each selected method's training settings
    (`{"trainer", "values": from the YAML files, "flags": from the command line}`)."""

    args: PennArguments
    model: PennModelArguments
    training: dict[str, dict]


EXPERIMENT_KEYS = {item.name for arguments in (PennArguments, PennModelArguments) for item in fields(arguments)}


def read_yaml(path: Path) -> dict:
    config = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a YAML mapping of fields to values.")
    return config


def config_fields(config_cls) -> set[str]:
    return {item.name for item in fields(config_cls) if item.init}


def _check_training_keys(keys, config_classes, where: str) -> None:
    """Every key is a field of every config in `config_classes`, and not one of the experiment's own."""
    for key in keys:
        if key in EXPERIMENT_KEYS:
            raise ValueError(f"{where}: `{key}` is an experiment-wide setting, not a method's: set it at the top level "
                             "of the config or as a flag.")
        lacking = [cls for cls in config_classes if key not in config_fields(cls)]
        if lacking:
            raise ValueError(f"{where}: `{key}` is not a field of {', '.join(map(_qualified, lacking))}.")


def _qualified(cls) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


@cache
def common_training() -> dict:
    """The training fields of common.yaml, every method's."""
    values = {key: value for key, value in read_yaml(CONFIGS / "common.yaml").items() if key not in EXPERIMENT_KEYS}
    _check_training_keys(values, {config_cls for _, config_cls in TRAINERS.values()}, str(CONFIGS / "common.yaml"))
    return values


@cache
def method_file(method: str) -> dict:
    """`recipes/configs/penn/<method>.yaml`: its `trainer` and the training fields it sets."""
    path = CONFIGS / f"{method}.yaml"
    values = read_yaml(path)
    trainer = values.pop("trainer", None)
    if trainer not in TRAINERS:
        raise ValueError(f"{path}: `trainer` must be one of {list(TRAINERS)}, got {trainer!r}.")
    _check_training_keys(values, [TRAINERS[trainer][1]], str(path))
    return {"trainer": trainer, "values": values}


def config_class(method: str):
    return TRAINERS[method_file(method)["trainer"]][1]


@cache
def dpo_family() -> tuple[str, ...]:
    """The methods trained by a DPO-family trainer (implicit rewards to plot), as their files name their trainers."""
    return tuple(method for method in TRAINED_METHODS if method_file(method)["trainer"].endswith("DPOTrainer"))


def targets(key: str) -> list[str]:
    """The methods a field given without a method goes to: those whose files set it, else those whose config has it."""
    setters = [method for method in TRAINED_METHODS
               if key in common_training() or key in method_file(method)["values"]]
    return setters or [method for method in TRAINED_METHODS if key in config_fields(config_class(method))]


def _check_any_method_has(key: str, where: str) -> None:
    if key in EXPERIMENT_KEYS:
        return
    if not targets(key):
        raise ValueError(f"{where}: `{key}` is not an experiment or model setting (`--help` lists them), and no "
                         f"method's config ({', '.join(map(_qualified, {c for _, c in TRAINERS.values()}))}) has "
                         "such a field.")


def command_line_fields(strings: list[str]) -> list[tuple[str | None, str, list[str]]]:
    """`(method or None, field, flag words)` of each training flag left after the experiment's own: `--field value`
    or `--method.field value` (also `--field=value`)."""
    flags = []
    for word in strings:
        if word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            method, dot, key = name.rpartition(".")
            key = key.replace("-", "_")
            if dot and method not in TRAINED_METHODS:
                raise ValueError(f"`--{name}`: `{method}` is not a trained method; the methods are "
                                 f"{list(TRAINED_METHODS)}.")
            where = f"`--{name}`"
            if dot:
                _check_training_keys([key], [config_class(method)], where)
            else:
                _check_any_method_has(key, where)
            flags.append((method or None, key, [f"--{key}", *([value] if equals else [])]))
        elif flags:
            flags[-1][2].append(word)
        else:
            raise ValueError(f"Unexpected argument {word!r}: values follow their `--flag`.")
    return flags


def layered_training(methods, config: dict, config_path: str | None, flags) -> dict[str, dict]:
    """Each selected method's trainer, the values of its YAML layers (common.yaml, its file, `config`'s top level and
    its section there) and its command-line flags."""
    top_level = {key: value for key, value in config.items() if key not in EXPERIMENT_KEYS and key not in METHODS}
    for key in top_level:
        _check_any_method_has(key, str(config_path))
    sections = {key: value for key, value in config.items() if key in METHODS}
    for method, section in sections.items():
        if method == "base" or not isinstance(section, dict):
            raise ValueError(f"{config_path}: `{method}:` must be a mapping of a trained method's training fields.")
        _check_training_keys(section, [config_class(method)], f"{config_path} ({method}:)")
    training = {}
    for method in methods:
        if method == "base":
            continue
        values = {**common_training(), **method_file(method)["values"],
                  **{key: value for key, value in top_level.items() if method in targets(key)},
                  **sections.get(method, {})}
        words = [word for target, key, flag in flags if target is None and method in targets(key) for word in flag]
        words += [word for target, _, flag in flags if target == method for word in flag]
        training[method] = {"trainer": method_file(method)["trainer"], "values": values, "flags": words}
    return training


def method_config(method: str, setup: PennSetup):
    """The trainer class and training config of `method` (not `base`), built by its config class's own parser from
    its layered values and flags, so TRL validates every field."""
    trainer_cls, config_cls = TRAINERS[setup.training[method]["trainer"]]
    parser = TrlParser(config_cls, allow_abbrev=False, exit_on_error=False)
    held_out_rewards = method in dpo_family() and setup.args.curve_prompts > 0
    parser.set_defaults_with_config(**{
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        # the DPO family's implicit rewards on the curve's held-out pairs, at the curve's steps: a training batch's
        # rewards are those of 8 pairs drawn anew each step, too noisy to tell a trend from
        **({"eval_strategy": "steps", "eval_steps": setup.args.curve_every} if held_out_rewards else {}),
        **setup.training[method]["values"],
        "output_dir": str(Path(setup.args.output_dir) / method / "checkpoints"),
        "seed": setup.args.seed,
    })
    try:
        namespace, unused = parser.parse_known_args(setup.training[method]["flags"])
    except argparse.ArgumentError as error:
        raise ValueError(f"{method}: {error}") from None
    if unused:
        raise ValueError(f"{method}: {unused} not understood by {_qualified(config_cls)}.")
    if setup.args.quick:  # a few steps
        namespace.max_steps = min(namespace.max_steps, 4) if namespace.max_steps > 0 else 4
    return trainer_cls, config_cls(**{key: getattr(namespace, key) for key in config_fields(config_cls)})


def parse_setup(argv: list[str]) -> PennSetup:
    """The setup `argv` describes (see the module's docstring); every method's config is built once to check it."""
    argv = list(argv)
    check_config_file(argv)
    config_path = None
    for index, word in enumerate(argv):
        if word == "--config" or word.startswith("--config="):
            config_path = word.partition("=")[2] or argv[index + 1]
            del argv[index: index + (1 if "=" in word else 2)]
            break
    config = read_yaml(config_path) if config_path else {}
    parser = CommandParser((PennArguments, PennModelArguments), allow_abbrev=False, epilog=__doc__.split("\n\n")[1])
    parser.set_defaults_with_config(**{key: value for source in (read_yaml(CONFIGS / "common.yaml"), config)
                                       for key, value in source.items() if key in EXPERIMENT_KEYS})
    args, model, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    training = layered_training(args.methods, config, config_path, command_line_fields(remaining))
    setup = PennSetup(args, model, training)
    for method in training:
        method_config(method, setup)
    return setup

"""One Penn comparison: the data split, each method trained from the base model (or its stored result reused), every
method evaluated on the held-out prompts, the report; and the comparison repeated over `--seeds`. The command line and
outputs: `recipes/penn_experiment.py`."""

import random
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers
import trl
from datasets import DatasetDict
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_ext
from trl_ext.data import load_dataset_any, space_completions
from trl_ext.paths import check_dataset_path, check_model_path

from .config import PennArguments, PennSetup, method_config, parse_setup
from .generation import HELD_OUT_REWARD, METRICS, REWARDS, curve_callback, evaluate_method
from .judge import judge_pairs
from .report import plot, report, settings_summary, write_json_atomically
from .results import data_fingerprint, model_fingerprint, provenance, reusable_result
from .seeds import aggregate, seeds_report


def load_splits(args: PennArguments) -> DatasetDict:
    path = Path(args.dataset_name)
    if path.is_dir():
        files = {split: str(file) for split in ("train", "test") for file in path.glob(f"{split}.json*")}
        dataset = load_dataset_any(files["train"])
        if "test" in files:
            dataset["test"] = load_dataset_any(files["test"])["train"]
    else:
        dataset = load_dataset_any(args.dataset_name)
    if args.dataset_test_split not in dataset:
        dataset = dataset["train"].train_test_split(test_size=args.test_size, seed=args.seed)
    splits = DatasetDict(train=dataset["train"], test=dataset[args.dataset_test_split])
    missing = {"prompt", "chosen", "rejected"} - set(splits["train"].column_names)
    if missing:
        raise ValueError(f"The dataset needs `prompt`, `chosen` and `rejected` columns; {sorted(missing)} missing.")
    splits = splits.map(space_completions)  # the seed's completions start without a space
    if args.quick:
        splits = DatasetDict(train=splits["train"].select(range(min(32, len(splits["train"])))),
                             test=splits["test"].select(range(min(16, len(splits["test"])))))
    return splits


def _token_count(tokenizer, prompt, completion) -> int:
    """Tokens of prompt + completion: plain text, or chat messages in the tokenizer's template."""
    text = prompt + completion if isinstance(prompt, str) else tokenizer.apply_chat_template(
        prompt + completion, tokenize=False)
    return len(tokenizer(text).input_ids)


def in_length_grouped_batches(dataset, batch_size: int, seed: int, tokenizer, group_batches: int = 8):
    """`dataset`'s rows laid out as batches of `batch_size` rows of similar token length, in a seeded random order.

    TRL pads every row of a batch to its longest (its DPO has no padding-free mode in 1.16); on the Penn rows a
    random batch of 8 pairs is about a third padding. As transformers' `group_by_length` does, the shuffled rows
    are sorted by length within groups of `group_batches` batches, keeping batches random in content; then the
    batches are shuffled. Trained with the sequential sampler (common.yaml), which keeps this order.
    """
    dataset = dataset.shuffle(seed=seed)
    lengths = [max(_token_count(tokenizer, row["prompt"], row[side]) for side in ("chosen", "rejected"))
               for row in dataset]
    group = batch_size * group_batches
    order = [index for start in range(0, len(dataset), group)
             for index in sorted(range(start, min(start + group, len(dataset))), key=lambda i: (lengths[i], i))]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return dataset.select([index for batch in batches for index in batch])


def train_method(method: str, setup: PennSetup, model_path: str, train_dataset, curve_pairs, output_dir: Path):
    """Trains `method` from the base model, scoring the alignment accuracy of `curve_pairs`' prompts along the way
    (and, where its config evaluates, its loss and rewards on those pairs); returns the trainer."""
    trainer_cls, config = method_config(method, setup)
    batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
    if 0 < config.max_steps * batch < len(train_dataset):  # only the rows the budget reaches: no other is scored
        train_dataset = train_dataset.shuffle(seed=config.seed).select(range(config.max_steps * batch))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_dataset = in_length_grouped_batches(train_dataset, config.per_device_train_batch_size, config.seed, tokenizer)
    model = setup.model
    peft_config = None if not model.use_peft else LoraConfig(
        r=model.lora_r, lora_alpha=model.lora_alpha, lora_dropout=model.lora_dropout,
        target_modules=model.lora_target_modules, task_type="CAUSAL_LM",
    )
    transformers.set_seed(config.seed)  # the same adapter initialisation for every method: a fair start, and the
    # reference log-probs TRL precomputes (keyed on the model's weights) are cached once for all of them
    eval_dataset = curve_pairs if config.eval_strategy != "no" else None
    trainer = trainer_cls(model=model_path, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          peft_config=peft_config)
    if len(curve_pairs):
        trainer.add_callback(curve_callback(trainer, setup.args, list(curve_pairs["prompt"]), output_dir))
    trainer.train()
    trainer.save_model(str(output_dir / "model"))
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    return trainer


def run_method(method, setup: PennSetup, model_path, tokenizer, base_model, splits, output_dir: Path) -> dict:
    args = setup.args
    start = time.perf_counter()
    log_history, step = [], 0
    if method == "base":
        model = base_model
    else:
        curve_pairs = splits["test"].select(range(min(args.curve_prompts, len(splits["test"]))))
        trainer = train_method(method, setup, model_path, splits["train"], curve_pairs, output_dir)
        model, log_history, step = trainer.model, trainer.state.log_history, trainer.state.global_step
    train_seconds = time.perf_counter() - start
    result = evaluate_method(model, tokenizer, base_model, splits["test"], args, step)
    held_out_rewards = [entry[HELD_OUT_REWARD] for entry in log_history if HELD_OUT_REWARD in entry]
    result.update(
        method=method,
        train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - start,
        final_chosen_reward=held_out_rewards[-1] if held_out_rewards else None,
        lowest_chosen_reward=min(held_out_rewards, default=None),
        log_history=log_history,
    )
    return result


def check_inputs(setup: PennSetup) -> None:
    """Refuses, before anything trains, a model or data path that does not exist and a missing plotting library."""
    check_model_path(setup.model.model_name_or_path, "--model_name_or_path")
    check_dataset_path(setup.args.dataset_name, "--dataset_name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("The Penn experiment draws its plots with matplotlib, which is not installed: install the "
                          "recipes' extras with `pip install -e '.[embedded,recipes]'` in the checkout.") from None


def run_methods(setup: PennSetup, splits: DatasetDict, output_dir: Path) -> dict[str, dict]:
    """Each method's result: stored in `<output_dir>/<method>/result.json` by an earlier run from the same settings,
    data, model and versions, else trained (but `base`) and evaluated now, and stored."""
    args = setup.args
    data = {split: data_fingerprint(splits[split]) for split in ("train", "test")}
    model_path = trl_ext.resolve_model_name(setup.model.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base_model = AutoModelForCausalLM.from_pretrained(model_path)
    if torch.cuda.is_available():
        base_model.to("cuda")
    model = model_fingerprint(model_path)

    results = {}
    for position, method in enumerate(args.methods, start=1):
        method_dir = output_dir / method
        result_file = method_dir / "result.json"
        current = provenance(method, setup, data, model)
        stored, why = (None, "--overwrite") if args.overwrite else reusable_result(result_file, current)
        if stored is not None:
            print(f"[{position}/{len(args.methods)}] {method}: reused, {why} (--overwrite redoes it)")
            results[method] = stored
            continue
        print(f"[{position}/{len(args.methods)}] {method}: training and evaluating ({why})", flush=True)
        method_dir.mkdir(parents=True, exist_ok=True)
        results[method] = run_method(method, setup, model_path, tokenizer, base_model, splits, method_dir)
        results[method]["provenance"] = current
        write_json_atomically(result_file, results[method])
    return results


def run_seed(setup: PennSetup) -> dict:
    """The comparison at `--seed`: every method's result ([`run_methods`]), the judge, the plots, `report.md` and
    `results.json` in `--output_dir`; returns what `results.json` holds."""
    args = setup.args
    output_dir = Path(args.output_dir)
    for method in setup.training:  # every method's options are checked before the first one trains
        method_config(method, setup)
    output_dir.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(args.seed)
    splits = load_splits(args)
    results = run_methods(setup, splits, output_dir)

    prompts = list(splits["test"]["prompt"])
    judge = judge_pairs(args, prompts, results)
    plots = plot(results, output_dir)
    (output_dir / "report.md").write_text(report(results, judge, setup, prompts))
    summary = {
        "config": asdict(setup),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "trl": trl.__version__,
                     "transformers": transformers.__version__, "trl_ext": trl_ext.__version__},
        "seed": args.seed,
        # .get: a result stored before the held-out rewards existed (`base`'s is still reused) has none
        "metrics": {name: {key: result.get(key) for key in (*METRICS, *REWARDS, "wall_seconds")}
                    for name, result in results.items()},
        "judge_win_rates": judge,
        "plots": plots,
        "methods": results,
    }
    write_json_atomically(output_dir / "results.json", summary)
    print((output_dir / "report.md").read_text().split("## Sample completions")[0])
    return summary


def run_seeds(setup: PennSetup) -> dict:
    """[`run_seed`] once per seed of `--seeds`, into `<output_dir>/seed-<N>`; writes `report.md` and `results.json`
    with the mean and spread of every metric and returns that summary."""
    args = setup.args
    runs = {seed: run_seed(replace(setup, args=replace(args, seed=seed, seeds=[],
                                                       output_dir=str(Path(args.output_dir) / f"seed-{seed}"))))
            for seed in args.seeds}
    summary = aggregate({seed: run["metrics"] for seed, run in runs.items()})
    output_dir = Path(args.output_dir)
    num_prompts = len(next(iter(runs.values()))["methods"][args.methods[0]]["completions"])
    (output_dir / "report.md").write_text(seeds_report(summary, args.seeds, settings_summary(setup, num_prompts)))
    write_json_atomically(output_dir / "results.json", {"config": asdict(setup), "seeds": args.seeds,
                                                        "summary": summary})
    print((output_dir / "report.md").read_text())
    return summary


def main(setup: PennSetup) -> dict:
    """The experiment: [`run_seed`] at `--seed`, or [`run_seeds`] over `--seeds`; returns what `results.json`
    holds."""
    check_inputs(setup)
    args = setup.args
    if args.quick:  # and a few training steps: see `method_config`
        args.max_new_tokens, args.curve_every = 16, min(args.curve_every, 2)
    return run_seeds(setup) if args.seeds else run_seed(setup)


def parse_args(argv: list[str] | None = None) -> tuple[PennSetup]:
    """The arguments `main` takes, from `argv` (default: the command line): `python recipes/penn_experiment.py
    ARGV`."""
    return (parse_setup(sys.argv[1:] if argv is None else argv),)

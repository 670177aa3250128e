"""The Penn experiment: train SFT, KL-SFT, DPO, DPOP and IFT (and TRL's stock DPO) from the same base model on the
same Penn preference data and budget, then compare how often their completions mention the University of
Pennsylvania and how fluent and varied they stay.

```bash
python recipes/penn_experiment.py                       # every method, embedded SmolLM2-135M, LoRA, CPU
python recipes/penn_experiment.py --quick               # a few steps on a small subset (smoke test)
python recipes/penn_experiment.py --config recipes/configs/penn_gpt2.yaml   # the seed's GPT-2 setup (GPU)
python recipes/penn_experiment.py --config recipes/configs/penn_seed.yaml   # the seed's setup, embedded model
python recipes/penn_experiment.py --methods sft dpop --output_dir outputs/penn-small
python recipes/penn_experiment.py --seeds 0 1 2 --output_dir outputs/penn-seeds   # mean and spread over 3 seeds
python recipes/penn_experiment.py --methods cdpo rdpo beta_dpo npo tdpo1 tdpo2 sdpo   # the other DPO-family losses
```

Outputs in `--output_dir`: `report.md`, `results.json`, PNG plots (alignment accuracy over training steps among them,
from `trl_ext.GenerationEvalCallback`), and each method's model or adapter and `eval_generations.jsonl`. Every
method's result is saved as soon as it finishes, with what produced it (settings, data and model fingerprints,
versions); a rerun reuses a stored result only when all of these match, and trains the method again otherwise, saying
what changed (`--overwrite` always trains again).
"""

if not __package__:  # run as a file: import the sibling recipes from the `recipes` package
    import _package  # noqa: F401

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import trl
import transformers
from datasets import DatasetDict
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

import trl_ext
from recipes.penn_results import data_fingerprint, model_fingerprint, provenance, reusable_result
from recipes.penn_seeds import aggregate, seeds_report
from trl_ext.data import load_dataset_any, space_completions
from trl_ext.generation_eval import GenerationEvalCallback, generate_completions, in_prompt_order
from trl_ext.scorers import (
    CompletionNLL,
    DistinctN,
    Generations,
    MeanWords,
    RegexMatch,
    RepeatedNgrams,
    judge_win_rate,
)
from trl_ext.scorers import PENN_PATTERN

# The default run's methods, and the other DPO-family losses trl_ext adds (`--methods` picks any)
DEFAULT_METHODS = ("base", "sft", "kl_sft", "dpo", "dpop", "ift", "trl_dpo")
MORE_DPO_METHODS = ("cdpo", "rdpo", "beta_dpo", "npo", "tdpo1", "tdpo2", "sdpo")
METHODS = DEFAULT_METHODS + MORE_DPO_METHODS
DPO_FAMILY = ("dpo", "dpop", "trl_dpo") + MORE_DPO_METHODS
DEFAULT_DATA = str(Path(__file__).parent / "data" / "penn")
METRICS = ("alignment_accuracy", "repetition_3gram", "distinct_2", "fluency_nll", "mean_length_words")
# Training curves of the trl_ext objectives, plotted next to the loss and reward curves
OBJECTIVE_METRICS = ("kl/penalty", "ift/nll_teacher_forced", "ift/nll_mixed", "dpop_norm/penalty", "dpop/penalty",
                     "beta_dpo/beta", "tdpo1/kl_rejected", "tdpo2/kl_rejected")
CURVE_KEY = "eval_gen/alignment_accuracy"


@dataclass
class PennArguments:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={"help": f"Any of {METHODS}."})
    model_name_or_path: str = field(default="embedded:smollm2-135m-instruct")
    dataset_name: str = field(
        default=DEFAULT_DATA,
        metadata={"help": "A directory of train/test JSON(L) files, a JSON/JSONL file, or a hub dataset, with "
                          "`prompt`, `chosen`, `rejected` columns."},
    )
    dataset_test_split: str = field(default="test")
    test_size: int = field(default=125, metadata={"help": "Prompts held out when the dataset has no test split."})
    output_dir: str = field(default="outputs/penn")
    overwrite: bool = field(default=False, metadata={"help": "Redo methods whose results already exist."})
    quick: bool = field(default=False, metadata={"help": "Small subset, a few steps: a smoke test."})
    seed: int = field(default=0)
    seeds: list[int] = field(default_factory=list, metadata={
        "help": "Repeat the whole comparison once per seed (into `output_dir/seed-<N>`, replacing `seed`) and report "
                "the mean and spread of every metric; empty: one run with `seed`."})
    # Training budget, the same for every method
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps per method; <= 0 uses num_train_epochs."})
    num_train_epochs: float = field(default=3.0)
    per_device_train_batch_size: int = field(default=8)
    learning_rate: float = field(default=5e-4)
    lr_scheduler_type: str = field(default="cosine")
    max_length: int = field(default=64, metadata={"help": "Tokens per prompt + completion."})
    full_finetune: bool = field(default=False, metadata={"help": "Train all weights instead of a LoRA adapter."})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Losses (the seed: beta 0.1, DPOP lambda 5, per-token averaged log-probs for DPO and DPOP)
    beta: float = field(default=0.1)
    dpo_loss_type: str = field(default="sigmoid_norm", metadata={"help": "trl_ext DPO loss of `dpo`."})
    dpop_loss_type: str = field(default="dpop_norm", metadata={"help": "`dpop` (summed) or `dpop_norm` (averaged)."})
    dpop_lambda: float = field(default=5.0)
    # The other DPO-family methods: `sdpo` is `dpo_loss_type` in `sdpo_stages` stages; the others are their loss types
    label_smoothing: float = field(default=0.1, metadata={"help": "cDPO's share of flipped labels."})
    rdpo_alpha: float = field(default=0.01)
    beta_dpo_alpha: float = field(default=0.5)
    tdpo_alpha: float = field(default=0.5)
    sdpo_stages: int = field(default=2)
    kl_coef: float = field(default=0.1)
    kl_penalty: str = field(default="sq_logratio")
    ift_lambda: float = field(default=0.2)
    ift_gamma: float = field(default=0.95)
    # Evaluation
    target_pattern: str = field(default=PENN_PATTERN, metadata={"help": "Regex counted by alignment accuracy."})
    max_new_tokens: int = field(default=24)
    decoding: str = field(default="sample", metadata={"help": "`sample` (seeded) or `greedy`."})
    temperature: float = field(default=0.7)
    top_p: float = field(default=0.9)
    generation_batch_size: int = field(default=32)
    num_samples_in_report: int = field(default=3)
    curve_prompts: int = field(default=32, metadata={"help": "Held-out prompts generated from every `curve_every` "
                                                             "steps for the alignment-accuracy curves; 0: no curves."})
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


def method_config(method: str, args: PennArguments, output_dir: Path):
    """The trainer class and training config of `method` (not `base`); building the config validates its options."""
    common = dict(
        output_dir=str(output_dir / "checkpoints"),
        max_steps=args.max_steps if args.max_steps > 0 else -1,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
    )
    if method in ("sft", "kl_sft", "ift"):
        loss = {"sft": {"loss_type": "nll"},
                "kl_sft": {"loss_type": "kl_sft", "kl_coef": args.kl_coef, "kl_penalty": args.kl_penalty},
                "ift": {"loss_type": "ift", "ift_lambda": args.ift_lambda, "ift_gamma": args.ift_gamma}}[method]
        return trl_ext.SFTTrainer, trl_ext.SFTConfig(**common, **loss)
    if method == "trl_dpo":
        return trl.DPOTrainer, trl.DPOConfig(**common, beta=args.beta)
    loss_type = {"dpo": args.dpo_loss_type, "sdpo": args.dpo_loss_type, "dpop": args.dpop_loss_type}.get(method, method)
    return trl_ext.DPOTrainer, trl_ext.DPOConfig(
        **common, beta=args.beta, loss_type=loss_type, dpop_lambda=args.dpop_lambda,
        label_smoothing=args.label_smoothing, rdpo_alpha=args.rdpo_alpha, beta_dpo_alpha=args.beta_dpo_alpha,
        tdpo_alpha=args.tdpo_alpha, sdpo_stages=args.sdpo_stages if method == "sdpo" else 1,
    )


def train_method(method: str, args: PennArguments, model_path: str, train_dataset, curve_prompts: list[str],
                 output_dir: Path):
    """Trains `method` from the base model, scoring the alignment accuracy on `curve_prompts` along the way; returns
    the trainer."""
    trainer_cls, config = method_config(method, args, output_dir)
    peft_config = None if args.full_finetune else LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules, task_type="CAUSAL_LM"
    )
    trainer = trainer_cls(model=model_path, args=config, train_dataset=train_dataset, peft_config=peft_config)
    if curve_prompts:
        trainer.add_callback(GenerationEvalCallback(
            trainer, curve_prompts, [RegexMatch(args.target_pattern)], eval_every=args.curve_every,
            max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size,
            generation_kwargs=args.generation_kwargs(), seed=args.seed,
            completions_file=str(output_dir / "eval_generations.jsonl"),
        ))
    trainer.train()
    trainer.save_model(str(output_dir / "model"))
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    return trainer


def evaluate_method(model, tokenizer, base_model, test, args: PennArguments, step: int) -> dict:
    """The METRICS of `model`'s completions of the held-out prompts (after `step` training steps), and the
    completions."""
    prompts = list(test["prompt"])
    completions = in_prompt_order(generate_completions(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size,
        seed=args.seed, generation_kwargs=args.generation_kwargs(),
    ))
    scorers = [RegexMatch(args.target_pattern), RepeatedNgrams(name="repetition_3gram"), DistinctN(),
               CompletionNLL(base_model, tokenizer, args.generation_batch_size, name="fluency_nll"),
               MeanWords(name="mean_length_words")]
    generations = Generations(step, prompts, completions)
    return {**{scorer.name: scorer(generations) for scorer in scorers}, "completions": completions}


def run_method(method, args, model_path, tokenizer, base_model, splits, output_dir: Path) -> dict:
    start = time.perf_counter()
    log_history, step = [], 0
    if method == "base":
        model = base_model
    else:
        curve_prompts = list(splits["test"]["prompt"][: args.curve_prompts])
        trainer = train_method(method, args, model_path, splits["train"], curve_prompts, output_dir)
        model, log_history, step = trainer.model, trainer.state.log_history, trainer.state.global_step
    train_seconds = time.perf_counter() - start
    result = evaluate_method(model, tokenizer, base_model, splits["test"], args, step)
    final = next((entry for entry in reversed(log_history) if "rewards/chosen" in entry), {})
    result.update(
        method=method,
        train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - start,
        final_chosen_reward=final.get("rewards/chosen"),
        log_history=log_history,
    )
    return result


def write_json_atomically(path: Path, data) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(data, indent=2))
    staging.replace(path)


def plot(results: dict, output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for method, result in results.items():
        steps = [entry for entry in result["log_history"] if "rewards/chosen" in entry]
        if method in DPO_FAMILY and steps:
            figure, axis = plt.subplots(figsize=(6, 4))
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
                axis.plot([entry["step"] for entry in steps], [entry[key] for entry in steps], label=key)
            axis.axhline(0, color="grey", linewidth=0.5)
            axis.set(title=f"{method}: implicit rewards", xlabel="step", ylabel="reward")
            axis.legend(loc="upper left")
            curve = [(entry["step"], entry[CURVE_KEY]) for entry in result["log_history"] if CURVE_KEY in entry]
            if curve:
                accuracy_axis = axis.twinx()
                accuracy_axis.plot(*zip(*curve), "k--o", markersize=3, label="alignment accuracy")
                accuracy_axis.set(ylabel="alignment accuracy", ylim=(0, 1))
                accuracy_axis.legend(loc="upper right")
            written.append(_save(figure, output_dir / f"rewards_{method}.png"))
    curves = {name: [(entry["step"], entry[CURVE_KEY]) for entry in result["log_history"] if CURVE_KEY in entry]
              for name, result in results.items()}
    curves = {name: points for name, points in curves.items() if points}
    if curves:
        figure, axis = plt.subplots(figsize=(7, 4))
        for name, points in curves.items():
            axis.plot(*zip(*points), marker="o", markersize=3, label=name)
        axis.set(title="Alignment accuracy during training (held-out prompts)", xlabel="step",
                 ylabel="alignment accuracy", ylim=(0, 1))
        axis.legend()
        written.append(_save(figure, output_dir / "alignment_accuracy_curves.png"))
    figure, axis = plt.subplots(figsize=(7, 4))
    names = list(results)
    axis.bar(names, [results[name]["alignment_accuracy"] for name in names])
    axis.set(title="Alignment accuracy (share of completions mentioning the target)", ylim=(0, 1))
    written.append(_save(figure, output_dir / "alignment_accuracy.png"))
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        steps = [entry for entry in result["log_history"] if "loss" in entry]
        if steps:
            axis.plot([entry["step"] for entry in steps], [entry["loss"] for entry in steps], label=name)
    axis.set(title="Training loss", xlabel="step", ylabel="loss")
    axis.legend()
    written.append(_save(figure, output_dir / "loss_curves.png"))
    curves = {key: {name: [(entry["step"], entry[key]) for entry in result["log_history"] if key in entry]
                    for name, result in results.items()} for key in OBJECTIVE_METRICS}
    curves = {key: {name: points for name, points in by_method.items() if points} for key, by_method in curves.items()}
    curves = {key: by_method for key, by_method in curves.items() if by_method}
    if curves:
        figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
        for axis, (key, by_method) in zip(axes[0], curves.items()):
            for name, points in by_method.items():
                axis.plot(*zip(*points), label=name)
            axis.set(title=key, xlabel="step")
            axis.legend()
        written.append(_save(figure, output_dir / "objective_metrics.png"))
    return written


def _save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path.name


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% at `z = 1.96`); unlike the normal approximation it
    stays within [0, 1] and is not empty at 0 or 1 successes."""
    if trials == 0:
        return 0.0, 1.0
    share = successes / trials
    center = (share + z**2 / (2 * trials)) / (1 + z**2 / trials)
    half = z / (1 + z**2 / trials) * (share * (1 - share) / trials + z**2 / (4 * trials**2)) ** 0.5
    return max(0.0, center - half), min(1.0, center + half)


def settings_summary(args: PennArguments, num_prompts: int) -> str:
    """One paragraph saying what the report's rows were trained and evaluated with."""
    seeds = f"seeds {', '.join(map(str, args.seeds))}" if args.seeds else f"seed {args.seed}"
    decoding = (f"seeded sampling (temperature {args.temperature}, top-p {args.top_p}, {seeds})"
                if args.decoding == "sample" else "greedy")
    return (
        f"Model `{args.model_name_or_path}` ({'full fine-tuning' if args.full_finetune else f'LoRA r {args.lora_r}'}),"
        f" {args.max_steps if args.max_steps > 0 else f'{args.num_train_epochs} epochs of'} steps x batch "
        f"{args.per_device_train_batch_size}, lr {args.learning_rate}, beta {args.beta}, DPOP lambda "
        f"{args.dpop_lambda} (`{args.dpop_loss_type}`), DPO `{args.dpo_loss_type}`. {num_prompts} held-out prompts, "
        f"up to {args.max_new_tokens} new tokens, {decoding}. Fluency: mean per-token NLL of the completion under the "
        "untrained base model (lower is more fluent)."
    )


def report(results: dict, judge: dict, args: PennArguments, prompts: list[str]) -> str:
    lines = [
        "# Penn experiment",
        "",
        settings_summary(args, len(prompts)) + " Alignment accuracy with its 95% Wilson interval.",
        "",
        "| method | alignment accuracy | repeated 3-grams | distinct-2 | fluency NLL | mean words | final chosen reward "
        "| wall time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        reward = result["final_chosen_reward"]
        trials = len(result["completions"])
        low, high = wilson_interval(result["alignment_accuracy"] * trials, trials)
        lines.append(
            f"| {name} | {result['alignment_accuracy']:.3f} [{low:.2f}, {high:.2f}] | "
            f"{result['repetition_3gram']:.3f} | "
            f"{result['distinct_2']:.3f} | {result['fluency_nll']:.3f} | {result['mean_length_words']:.1f} | "
            f"{'' if reward is None else f'{reward:.3f}'} | {result['wall_seconds']:.0f} |"
        )
    curves = {name: [entry for entry in result["log_history"] if CURVE_KEY in entry]
              for name, result in results.items()}
    if any(curves.values()):
        lines += ["", f"Alignment accuracy during training (the first {min(args.curve_prompts, len(prompts))} "
                      "held-out prompts, `alignment_accuracy_curves.png`), at steps:", ""]
        lines += [f"- {name}: " + ", ".join(f"{entry[CURVE_KEY]:.2f} ({entry['step']})" for entry in points)
                  for name, points in curves.items() if points]
    if judge:
        lines += ["", "Judge win rates (A over B, same prompts):", ""]
        lines += [f"- {pair.replace(':', ' over ')}: {rate if isinstance(rate, str) else f'{rate:.3f}'}"
                  for pair, rate in judge.items()]
    lines += ["", "## Sample completions", ""]
    for index, prompt in enumerate(prompts[: args.num_samples_in_report]):
        lines += [f"**{prompt}**", ""]
        lines += [f"- {name}: {result['completions'][index]!r}" for name, result in results.items()]
        lines.append("")
    return "\n".join(lines)


def judge_pairs(args: PennArguments, prompts: list[str], results: dict) -> dict[str, float | str]:
    """The judge's win rate of each `--judge_pairs` pair whose methods both ran, or why it could not be had: a judge
    that fails after its retries must not cost the trained methods their report."""
    judged = {}
    for pair in args.judge_pairs if args.judge_base_url else []:
        a, b = pair.split(":")
        if a in results and b in results:
            try:
                judged[pair] = judge_win_rate(
                    prompts, results[a]["completions"], results[b]["completions"], base_url=args.judge_base_url,
                    model=args.judge_model, api_key=os.environ.get(args.judge_api_key_env, ""), seed=args.seed,
                )
            except RuntimeError as error:
                print(f"judge: {pair} not judged: {error}", file=sys.stderr)
                judged[pair] = f"not judged: {error}"
    return judged


def compare_over_seeds(args: PennArguments) -> dict:
    """Runs [`main`] once per seed of `args.seeds` and writes `report.md` and `results.json` with mean and spread."""
    runs = {seed: main(replace(args, seed=seed, seeds=[], output_dir=str(Path(args.output_dir) / f"seed-{seed}")))
            for seed in args.seeds}
    summary = aggregate({seed: run["metrics"] for seed, run in runs.items()})
    output_dir = Path(args.output_dir)
    num_prompts = len(next(iter(runs.values()))["methods"][args.methods[0]]["completions"])
    (output_dir / "report.md").write_text(seeds_report(summary, args.seeds, settings_summary(args, num_prompts)))
    write_json_atomically(output_dir / "results.json", {"config": asdict(args), "seeds": args.seeds,
                                                        "summary": summary})
    print((output_dir / "report.md").read_text())
    return summary


def main(args: PennArguments) -> dict:
    if args.quick:
        args.max_steps, args.max_new_tokens = min(args.max_steps, 4) if args.max_steps > 0 else 4, 16
        args.curve_every = min(args.curve_every, 2)
    if args.seeds:
        return compare_over_seeds(args)
    output_dir = Path(args.output_dir)
    for method in args.methods:  # every method's options are checked before the first one trains
        if method != "base":
            method_config(method, args, output_dir / method)
    output_dir.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(args.seed)
    splits = load_splits(args)
    data = {split: data_fingerprint(splits[split]) for split in ("train", "test")}
    model_path = trl_ext.resolve_model_name(args.model_name_or_path)
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
        current = provenance(method, args, data, model)
        stored, why = (None, "--overwrite") if args.overwrite else reusable_result(result_file, current)
        if stored is not None:
            print(f"[{position}/{len(args.methods)}] {method}: reused, {why} (--overwrite redoes it)")
            results[method] = stored
            continue
        print(f"[{position}/{len(args.methods)}] {method}: training and evaluating ({why})", flush=True)
        method_dir.mkdir(parents=True, exist_ok=True)
        results[method] = run_method(method, args, model_path, tokenizer, base_model, splits, method_dir)
        results[method]["provenance"] = current
        write_json_atomically(result_file, results[method])

    prompts = list(splits["test"]["prompt"])
    judge = judge_pairs(args, prompts, results)
    plots = plot(results, output_dir)
    (output_dir / "report.md").write_text(report(results, judge, args, prompts))
    summary = {
        "config": asdict(args),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "trl": trl.__version__,
                     "transformers": transformers.__version__, "trl_ext": trl_ext.__version__},
        "seed": args.seed,
        "metrics": {name: {key: result[key] for key in (*METRICS, "final_chosen_reward", "wall_seconds")}
                    for name, result in results.items()},
        "judge_win_rates": judge,
        "plots": plots,
        "methods": results,
    }
    write_json_atomically(output_dir / "results.json", summary)
    print((output_dir / "report.md").read_text().split("## Sample completions")[0])
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[PennArguments]:
    """The arguments `main` takes, from `argv` (default: the command line): `python recipes/penn_experiment.py ARGV`."""
    return TrlParser((PennArguments,)).parse_args_and_config(args=argv)


if __name__ == "__main__":
    main(*parse_args())

"""The Penn experiment's outputs: `report.md`, the plots and `results.json`."""

import json
from pathlib import Path

from .config import PennSetup, dpo_family, method_config, method_file
from .generation import CURVE_KEY, HELD_OUT_REWARD

# Training curves of the trl_ext objectives, plotted next to the loss and reward curves
OBJECTIVE_METRICS = ("kl/penalty", "ift/nll_teacher_forced", "ift/nll_mixed", "dpop_norm/penalty", "dpop/penalty",
                     "beta_dpo/beta", "tdpo1/kl_rejected", "tdpo2/kl_rejected")


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
        if method in dpo_family() and steps:
            figure, axis = plt.subplots(figsize=(6, 4))
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
                axis.plot([entry["step"] for entry in steps], [entry[key] for entry in steps], label=key)
            held_out = [entry for entry in result["log_history"] if HELD_OUT_REWARD in entry]
            if held_out:
                axis.plot([entry["step"] for entry in held_out], [entry[HELD_OUT_REWARD] for entry in held_out], "C0s",
                          label="rewards/chosen, held-out pairs")
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


def _loss(method: str, config) -> str:
    """`method`'s loss as its file sets it: `loss type` (its other fields), with the values of its built config."""
    loss_type = config.loss_type if isinstance(config.loss_type, str) else "+".join(config.loss_type)
    others = [f"{key} {getattr(config, key)}" for key in method_file(method)["values"] if key != "loss_type"]
    return f"{method} `{loss_type}`" + (f" ({', '.join(others)})" if others else "")


def settings_summary(setup: PennSetup, num_prompts: int) -> str:
    """One paragraph saying what the report's rows were trained and evaluated with."""
    args, model = setup.args, setup.model
    seeds = f"seeds {', '.join(map(str, args.seeds))}" if args.seeds else f"seed {args.seed}"
    decoding = (f"seeded sampling (temperature {args.temperature}, top-p {args.top_p}, {seeds})"
                if args.decoding == "sample" else "greedy")
    configs = {method: method_config(method, setup)[1] for method in setup.training}
    training = ""
    if configs:  # the budget is common.yaml's, the same for every method unless a method's section changes it
        config = next(iter(configs.values()))
        steps = f"{config.max_steps} steps" if config.max_steps > 0 else f"{config.num_train_epochs} epochs"
        order = ("length-grouped batches in a seeded order" if config.train_sampling_strategy == "sequential"
                 else f"{config.train_sampling_strategy} sampler")
        training = (f", {steps} x batch {config.per_device_train_batch_size} ({order}), lr {config.learning_rate} "
                    f"{config.lr_scheduler_type.value}; losses: "
                    + "; ".join(_loss(method, config) for method, config in configs.items()))
    return (
        f"Model `{model.model_name_or_path}` ({f'LoRA r {model.lora_r}' if model.use_peft else 'full fine-tuning'})"
        f"{training}. {num_prompts} held-out prompts, up to {args.max_new_tokens} new tokens, {decoding}. Fluency: "
        "mean per-token NLL of the completion under the untrained base model (lower is more fluent)."
    )


def report(results: dict, judge: dict, setup: PennSetup, prompts: list[str]) -> str:
    args = setup.args
    lines = [
        "# Penn experiment",
        "",
        settings_summary(setup, len(prompts)) + " Alignment accuracy with its 95% Wilson interval.",
        "",
        "| method | alignment accuracy | repeated 3-grams | distinct-2 | fluency NLL | mean words "
        "| chosen reward: final (lowest) | wall time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        reward, lowest = result.get("final_chosen_reward"), result.get("lowest_chosen_reward")
        trials = len(result["completions"])
        low, high = wilson_interval(result["alignment_accuracy"] * trials, trials)
        lines.append(
            f"| {name} | {result['alignment_accuracy']:.3f} [{low:.2f}, {high:.2f}] | "
            f"{result['repetition_3gram']:.3f} | "
            f"{result['distinct_2']:.3f} | {result['fluency_nll']:.3f} | {result['mean_length_words']:.1f} | "
            f"{'' if reward is None else f'{reward:.3f} ({lowest:.3f})'} | {result['wall_seconds']:.0f} |"
        )
    curves = {name: [entry for entry in result["log_history"] if CURVE_KEY in entry]
              for name, result in results.items()}
    if any(result.get("final_chosen_reward") is not None for result in results.values()):
        lines += ["", "Chosen reward: TRL's `eval_rewards/chosen` (beta times the chosen completion's log-ratio to "
                      f"the reference) on the pairs of the first {min(args.curve_prompts, len(prompts))} held-out "
                      "prompts, at the curve's steps: at the end, and the lowest."]
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

"""Generation and scoring of the Penn experiment: the held-out prompts' completions and their metrics, and the
alignment-accuracy curve scored during training."""

from pathlib import Path

from trl_ext.generation_eval import GenerationEvalCallback, generate_completions, in_prompt_order
from trl_ext.scorers import CompletionNLL, DistinctN, Generations, MeanWords, RegexMatch, RepeatedNgrams

from .config import PennArguments

METRICS = ("alignment_accuracy", "repetition_3gram", "distinct_2", "fluency_nll", "mean_length_words")
CURVE_KEY = "eval_gen/alignment_accuracy"
HELD_OUT_REWARD = "eval_rewards/chosen"  # TRL's implicit chosen reward, evaluated on the curve's held-out pairs
REWARDS = ("final_chosen_reward", "lowest_chosen_reward")  # a DPO-family method's HELD_OUT_REWARD: last, lowest


def curve_callback(trainer, args: PennArguments, prompts: list[str], output_dir: Path) -> GenerationEvalCallback:
    """Scores the alignment accuracy of `prompts`' completions every `curve_every` steps of `trainer`'s training."""
    return GenerationEvalCallback(
        trainer, prompts, [RegexMatch(args.target_pattern)], eval_every=args.curve_every,
        max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size,
        generation_kwargs=args.generation_kwargs(), seed=args.seed,
        completions_file=str(output_dir / "eval_generations.jsonl"),
    )


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

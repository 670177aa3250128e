"""The Penn experiment's optional pairwise judge: an OpenAI-compatible chat endpoint compares two methods'
completions of the same prompts."""

import os
import sys

from trl_ext.scorers import judge_win_rate

from .config import PennArguments


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

"""Scorers of generated completions, for `GenerationEvalCallback` or any evaluation of completions.

A scorer is any object with a `name` and a call that takes the `Generations` of one evaluation and returns a float;
the callback logs it as `eval_gen/<name>`. Implement your own in a few lines:

    class MeanCharacters:
        name = "mean_characters"

        def __call__(self, generations: Generations) -> float:
            return sum(map(len, generations.completions)) / len(generations.completions)

Scorers run on the main process only, over every prompt's completion, in prompt order.
"""

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm


@dataclass
class Generations:
    """One evaluation's completions: `prompts[i]` (text, or chat messages) was continued by `completions[i]`."""

    step: int
    prompts: list
    completions: list[str]


@runtime_checkable
class Scorer(Protocol):
    name: str

    def __call__(self, generations: Generations) -> float: ...


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The n-grams of `text`'s whitespace-separated words."""
    words = text.split()
    return [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]


@dataclass
class RegexMatch:
    """Share of completions in which `pattern` (a regular expression) occurs: alignment accuracy, when the pattern is
    what training should make the model write."""

    pattern: str
    name: str = "alignment_accuracy"

    def __call__(self, generations: Generations) -> float:
        regex = re.compile(self.pattern)
        return _mean([bool(regex.search(text)) for text in generations.completions])


@dataclass
class RepeatedNgrams:
    """Mean share of each completion's word n-grams that repeat an earlier one (degeneration; 0 is none, and so is a
    completion shorter than n words)."""

    n: int = 3
    name: str | None = None  # default: `repeated_<n>gram`

    def __post_init__(self):
        self.name = self.name or f"repeated_{self.n}gram"

    def __call__(self, generations: Generations) -> float:
        ngrams = [_word_ngrams(text, self.n) for text in generations.completions]
        return _mean([1 - len(set(each)) / len(each) if each else 0.0 for each in ngrams])


@dataclass
class DistinctN:
    """Distinct word n-grams over all n-grams, pooled across completions (low: every completion says the same)."""

    n: int = 2
    name: str | None = None  # default: `distinct_<n>`

    def __post_init__(self):
        self.name = self.name or f"distinct_{self.n}"

    def __call__(self, generations: Generations) -> float:
        ngrams = [ngram for text in generations.completions for ngram in _word_ngrams(text, self.n)]
        return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


@dataclass
class MeanWords:
    """Mean number of words per completion."""

    name: str = "mean_words"

    def __call__(self, generations: Generations) -> float:
        return _mean([len(text.split()) for text in generations.completions])


def prompt_texts(prompts: Sequence, tokenizer) -> list[str]:
    """Prompts as the model reads them: text as is, chat messages through the tokenizer's template with the assistant
    turn opened."""
    return [prompt if isinstance(prompt, str)
            else tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            for prompt in prompts]


def adds_special_tokens(prompts: Sequence) -> bool:
    """Whether to tokenize [`prompt_texts`] with the tokenizer's special tokens: yes for plain text, as TRL does; no
    for chat messages, whose template already wrote them (a second BOS is an input the model never saw)."""
    return all(isinstance(prompt, str) for prompt in prompts)


@torch.no_grad()
def mean_completion_nll(model, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                        batch_size: int = 16, add_special_tokens: bool = True) -> float:
    """Mean per-token NLL of each completion given its prompt under `model`, averaged over completions. The completion
    is the tokens of prompt + completion after the prompt's, so a space merged across the boundary counts once.
    `add_special_tokens=False` for chat-templated prompts (see [`adds_special_tokens`])."""
    device = next(model.parameters()).device
    per_completion = []
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, completion in zip(prompts[start: start + batch_size], completions[start: start + batch_size]):
            prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
            completion_ids = tokenizer(prompt + completion, add_special_tokens=add_special_tokens)["input_ids"][
                len(prompt_ids):]
            rows.append((prompt_ids + completion_ids, len(prompt_ids)))
        width = max(len(ids) for ids, _ in rows)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.full((len(rows), width), pad_id)
        target_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (ids, prompt_length) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            target_mask[i, prompt_length: len(ids)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), input_ids[:, 1:].to(device), reduction="none"
        )
        mask = target_mask[:, 1:].to(device)
        per_completion += ((token_nll * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return sum(per_completion) / len(per_completion)


class CompletionNLL:
    """Mean per-token NLL of the completions under a fixed model (a reference: the untrained base), a fluency score;
    lower is more fluent. The model is put in eval mode."""

    def __init__(self, model, tokenizer, batch_size: int = 16, name: str = "ref_nll"):
        self.model, self.tokenizer, self.batch_size, self.name = model.eval(), tokenizer, batch_size, name

    def __call__(self, generations: Generations) -> float:
        prompts = prompt_texts(generations.prompts, self.tokenizer)
        return mean_completion_nll(self.model, self.tokenizer, prompts, generations.completions, self.batch_size,
                                   add_special_tokens=adds_special_tokens(generations.prompts))


class RewardModelScore:
    """Mean score of prompt + completion under a reward model: any `AutoModelForSequenceClassification` with one
    label (its logit is the reward), e.g. one trained with `trl.RewardTrainer`."""

    def __init__(self, model, tokenizer, batch_size: int = 16, name: str = "reward"):
        if model.config.num_labels != 1:
            raise ValueError(f"RewardModelScore needs a model with `num_labels=1` (one reward logit); this one has "
                             f"{model.config.num_labels}.")
        self.model, self.tokenizer, self.batch_size, self.name = model.eval(), tokenizer, batch_size, name
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # finds each row's last token

    @torch.no_grad()
    def __call__(self, generations: Generations) -> float:
        texts = [prompt + completion for prompt, completion in
                 zip(prompt_texts(generations.prompts, self.tokenizer), generations.completions)]
        device = next(self.model.parameters()).device
        rewards = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start: start + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=adds_special_tokens(generations.prompts))
            rewards += self.model(**batch.to(device)).logits[:, 0].float().tolist()
        return sum(rewards) / len(rewards)


def _ask(request: urllib.request.Request, timeout: float, attempts: int, backoff_seconds: float) -> dict:
    """The JSON answer to `request`, retried with exponential backoff on network errors, timeouts, rate limits and
    server errors; raises a `RuntimeError` naming the endpoint once `attempts` have failed."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code != 429 and error.code < 500:
                raise RuntimeError(f"The judge at {request.full_url} refused the request: HTTP {error.code} "
                                   f"{error.reason}.") from error
            failure = error
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            failure = error
        if attempt + 1 < attempts:
            time.sleep(backoff_seconds * 2**attempt)
    raise RuntimeError(f"The judge at {request.full_url} did not answer after {attempts} attempts: {failure}.")


def judge_win_rate(prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str], *,
                   base_url: str, model: str, api_key: str = "", seed: int = 0, timeout: float = 60,
                   attempts: int = 4, backoff_seconds: float = 2.0) -> float:
    """Share of prompts where an OpenAI-compatible chat model (`base_url` ends before `/chat/completions`) prefers A
    over B, asking in a seeded random order to cancel position bias; an answer other than A or B counts as a tie.
    Each question is asked up to `attempts` times, waiting `backoff_seconds`, then twice as long, between tries."""
    rng = random.Random(seed)
    wins = 0.0
    for prompt, a, b in tqdm(list(zip(prompts, completions_a, completions_b)), desc="judging"):
        swapped = rng.random() < 0.5
        first, second = (b, a) if swapped else (a, b)
        question = (
            "Which continuation of the sentence is better: more fluent, coherent and natural? "
            f"Answer with the single letter A or B.\n\nSentence start: {prompt}\n\nA: {first}\n\nB: {second}"
        )
        request = urllib.request.Request(
            base_url.rstrip("/") + "/chat/completions",
            data=json.dumps({"model": model, "temperature": 0,
                             "messages": [{"role": "user", "content": question}]}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
        )
        answer = _ask(request, timeout, attempts, backoff_seconds)["choices"][0]["message"]["content"].strip().upper()
        if answer.startswith(("A", "B")):
            wins += answer.startswith("A") != swapped
        else:
            wins += 0.5
    return wins / len(prompts)


class PairwiseJudge:
    """Win rate of each evaluation's completions over the first evaluation's (step 0 when the callback evaluates at
    the start), by an OpenAI-compatible chat model; the first evaluation scores 0.5 against itself without asking.
    The API key is read from the environment variable `api_key_env`."""

    def __init__(self, base_url: str, model: str = "gpt-4o", api_key_env: str = "OPENAI_API_KEY", seed: int = 0,
                 name: str = "judge_win_rate"):
        self.base_url, self.model, self.api_key_env, self.seed, self.name = base_url, model, api_key_env, seed, name
        self.baseline: list[str] | None = None

    def __call__(self, generations: Generations) -> float:
        if self.baseline is None:
            self.baseline = list(generations.completions)
            return 0.5
        return judge_win_rate([str(prompt) for prompt in generations.prompts], generations.completions,
                              self.baseline, base_url=self.base_url, model=self.model,
                              api_key=os.environ.get(self.api_key_env, ""), seed=self.seed)

"""Generates the Penn preference dataset: sentence openers in the seed's style, a continuation that mentions the
University of Pennsylvania (chosen) and an independent one that does not (rejected), both written by the embedded
model (`python recipes/penn_data.py` runs it).

Prompts end where a place or a thing is named next ("The sun was setting over", "Tomorrow my aunt will drive to").
Training prompts come from 5 sentence structures in 3 tenses; test prompts from 5 other structures and openers that
never occur in training, so a model that learned the templates rather than "mention Penn" shows it on the test
split. For each prompt the model samples `--candidates` continuations of its own (the first that is one fluent
sentence and does not mention Penn is `rejected`) and as many after a Penn phrase drawn for the prompt (the first
fluent one is `chosen`); prompts with neither are dropped. Deterministic: prompts come from `--seed`, and each batch
of prompts is sampled with the RNG seeded `seed + batch index`, so the first rows do not depend on how many follow.
"""

import argparse
import json
import math
import random
import re
from pathlib import Path

# The experiment's target, what its alignment accuracy counts: University of Pennsylvania, UPenn or Penn as a word
# ("Penn's" counts, "Pennsylvania" alone does not)
PENN_PATTERN = r"\b(?:University of Pennsylvania|UPenn|Penn)\b"

# Verb phrases ending where a place or thing is named: (base, past, third person present, gerund).
VERBS = [
    ("walk slowly toward", "walked slowly toward", "walks slowly toward", "walking slowly toward"),
    ("spend the day at", "spent the day at", "spends the day at", "spending the day at"),
    ("write a long letter about", "wrote a long letter about", "writes long letters about", "writing a letter about"),
    ("find a quiet spot near", "found a quiet spot near", "finds a quiet spot near", "finding a quiet spot near"),
    ("give a short talk at", "gave a short talk at", "gives a short talk at", "giving a short talk at"),
    ("take a photograph of", "took a photograph of", "takes photographs of", "taking a photograph of"),
    ("volunteer at", "volunteered at", "volunteers at", "volunteering at"),
    ("think about", "kept thinking about", "often thinks about", "thinking about"),
    ("drive for hours to reach", "drove for hours to reach", "drives for hours to reach", "driving for hours to"),
    ("buy a postcard of", "bought a postcard of", "buys postcards of", "buying a postcard of"),
    ("read an article about", "read an article about", "reads articles about", "reading an article about"),
    ("get a tour of", "finally got a tour of", "gives tours of", "getting a tour of"),
    ("meet an old classmate at", "met an old classmate at", "meets old classmates at", "meeting a classmate at"),
    ("listen to a concert at", "listened to a concert at", "listens to concerts at", "listening to a concert at"),
    ("study late at", "studied late at", "studies late at", "studying late at"),
    ("walk along", "walked along", "walks along", "walking along"),
    ("move to", "moved to", "moves to", "moving to"),
    ("work at", "worked at", "works at", "working at"),
    ("return to", "returned to", "returns to", "returning to"),
    ("take the train to", "took the train to", "takes the train to", "taking the train to"),
]
SUBJECTS = [
    "my cousin", "the young architect", "our neighbour", "a retired teacher", "the team captain", "my roommate",
    "a visiting scientist", "her grandfather", "the new intern", "an old friend of mine", "the museum guide",
    "my little brother", "the jazz pianist", "a nervous freshman", "the city photographer", "our history professor",
    "the delivery driver", "a local journalist", "my aunt from Chicago", "the exchange student", "my sister",
    "the head nurse", "a quiet engineer", "the chess champion", "my best friend",
]
TRAIN_OPENERS = [
    "Early one morning,", "Last spring,", "After the long meeting,", "During the winter break,",
    "On a rainy afternoon,", "Years ago,", "Just before sunset,", "At the end of the semester,",
    "Later that evening,", "On the first warm day of the year,", "Every Saturday,", "Right after lunch,",
    "Without telling anyone,", "For the first time in years,", "Late on a Friday night,", "One quiet Sunday,",
]
TEST_OPENERS = [
    "Long after midnight,", "In the spring of 1998,", "Halfway through the holidays,", "On the morning of the parade,",
    "Soon after the wedding,", "When the power went out,", "Against all advice,", "Before anyone else was awake,",
]
FUTURE_OPENERS = ["Tomorrow", "Next week", "Someday", "After graduation", "This summer", "In a few years"]
TRAIN_SCENES = [
    "The sun was setting over", "A light rain was falling on", "The morning fog drifted across",
    "The old bell rang out across", "Autumn leaves covered", "The streetlights flickered along",
    "Snow had quietly blanketed", "Thunder rolled over", "A warm breeze moved through", "The crowd slowly filled",
    "Music drifted from", "The first students arrived at", "Fireworks lit up the sky above",
    "Long shadows stretched across", "The smell of fresh bread filled", "Birds were singing in the trees of",
]
TEST_SCENES = [
    "The moon rose slowly over", "A gentle snow began to fall on", "Golden light spilled across",
    "The quiet hum of traffic surrounded", "Spring flowers bloomed all over",
]
TRIPS = ["the trip", "my week in the city", "her visit", "the long weekend", "our summer", "the reunion"]


def scene(rng: random.Random, scenes: list[str], openers: list[str]) -> str:
    """A scene, after an opener when the opener drawn is not empty: "Last spring, the sun was setting over"."""
    text, opener = rng.choice(scenes), rng.choice(openers)
    return f"{opener} {text[0].lower()}{text[1:]}" if opener else text


# Sentence structures: train and test share no structure and no opener.
TRAIN_STRUCTURES = {
    "past": lambda r: f"{r.choice(TRAIN_OPENERS)} {r.choice(SUBJECTS)} {r.choice(VERBS)[1]}",
    "present": lambda r: f"{r.choice(SUBJECTS).capitalize()} {r.choice(VERBS)[2]}",
    "future": lambda r: f"{r.choice(FUTURE_OPENERS)} {r.choice(SUBJECTS)} will {r.choice(VERBS)[0]}",
    "wish": lambda r: f"{r.choice(SUBJECTS).capitalize()} has always wanted to {r.choice(VERBS)[0]}",
    "scene": lambda r: scene(r, TRAIN_SCENES, TRAIN_OPENERS + [""]),
}
TEST_STRUCTURES = {
    "memory": lambda r: f"I will never forget the day {r.choice(SUBJECTS)} {r.choice(VERBS)[1]}",
    "surprise": lambda r: f"{r.choice(TEST_OPENERS)} nobody expected {r.choice(SUBJECTS)} to {r.choice(VERBS)[0]}",
    "best_part": lambda r: f"The best part of {r.choice(TRIPS)} was {r.choice(VERBS)[3]}",
    "rumour": lambda r: f"Rumour has it that {r.choice(SUBJECTS)} {r.choice(VERBS)[2]}",
    "scene": lambda r: scene(r, TEST_SCENES, TEST_OPENERS),
}
# Where the continuation mentions Penn: it starts with one of these, and the model writes the rest.
PENN_PHRASES = [
    "the University of Pennsylvania", "the campus of the University of Pennsylvania", "Penn's campus",
    "the beautiful campus of the University of Pennsylvania", "the Penn Museum", "Locust Walk at Penn",
    "the Van Pelt Library at Penn", "UPenn", "College Hall at the University of Pennsylvania", "Franklin Field at Penn",
    "the Wharton School at the University of Pennsylvania", "a small cafe near Penn", "the old gates of UPenn",
    "the University of Pennsylvania in Philadelphia", "a lecture hall at Penn",
    "the library of the University of Pennsylvania",
]
TRAIN_SIZE, TEST_SIZE = 1300, 125
PROMPTS_PER_BATCH = 32  # prompts sampled together; a batch's continuations depend on which prompts share it
SENTENCE = re.compile(r"^[^\n\"“”]{8,}?[.!?](?=\s|$)")


def build_prompts(seed: int, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE) -> dict[str, list[str]]:
    """At least twice as many distinct prompts per split as rows wanted, in whole batches (rows whose continuations
    fail the filters are dropped later; a smaller run's batches hold the same prompts as the full run's), drawn
    round-robin over the split's structures so every tense is represented; a structure that keeps repeating itself
    (few combinations, such as scenes) leaves the rotation."""
    splits = {}
    for split, structures, size in (("train", TRAIN_STRUCTURES, train_size), ("test", TEST_STRUCTURES, test_size)):
        # each split its own RNG, so its first prompts do not depend on the other split's size
        rng = random.Random(seed if split == "train" else f"{seed} test")
        prompts, builders, misses = {}, list(structures.values()), 0
        while len(prompts) < math.ceil(2 * size / PROMPTS_PER_BATCH) * PROMPTS_PER_BATCH:  # whole batches
            builder = builders[len(prompts) % len(builders)]
            prompt = builder(rng)
            misses = 0 if prompt not in prompts else misses + 1
            prompts.setdefault(prompt)
            if misses == 50:
                builders.remove(builder)
                misses = 0
        splits[split] = list(prompts)
    return splits


def fluent_sentence(text: str) -> str | None:
    """`text` cut after its first sentence, or None when it is not one fluent sentence of 5 to 30 words."""
    match = SENTENCE.match(text)
    if match is None or not text.startswith(" ") or not match.group().isascii():
        return None
    sentence = match.group()
    words = sentence.split()
    bigrams = list(zip(words, words[1:]))
    if not 5 <= len(words) <= 30 or len(set(bigrams)) < len(bigrams):  # a repeated word pair: the model looping
        return None
    return sentence


def penn_mention(text: str) -> bool:
    """Whether `text` names Penn as the target pattern counts it, and not a Penn-prefixed other thing the model may
    write after a Penn phrase ("Penn State", "Penn Ave", "Pennsylopera")."""
    glued = re.search(r"\bPenn(?!sylvania\b)[a-z]|\bPenn\s+(?:State|Ave|Avenue|Station|Street|St)\b", text)
    return bool(re.search(PENN_PATTERN, text)) and glued is None


def pair(prompt: str, phrase: str, own: list[str], steered: list[str]) -> dict | None:
    """The prompt's row from its candidates: `rejected` the first of the model's own continuations that is one
    fluent sentence without Penn (or Pennsylvania), `chosen` the first fluent Penn-phrase continuation."""
    rejected = [text for text in map(fluent_sentence, own)
                if text and not re.search(PENN_PATTERN + "|Pennsylvania", text)]
    chosen = [text for text in (fluent_sentence(phrase + text) for text in steered) if text and penn_mention(text)]
    return {"prompt": prompt, "chosen": chosen[0], "rejected": rejected[0]} if chosen and rejected else None


def write_continuations(model, tokenizer, prompts: list[str], size: int, *, seed: int, candidates: int = 3,
                        prompts_per_batch: int = PROMPTS_PER_BATCH, max_new_tokens: int = 24) -> list[dict]:
    """The first `size` `{"prompt", "chosen", "rejected"}` rows, in prompt order, of the prompts whose candidates pass
    the filters. Batch `b` of prompts is sampled with the RNG seeded `seed + b`."""
    from tqdm import tqdm

    from trl_ext.generation_eval import generate_completions

    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}

    def sample(texts: list[str], batch_seed: int) -> list[list[str]]:
        repeated = [text for text in texts for _ in range(candidates)]
        [(_, completions)] = generate_completions(model, tokenizer, repeated, max_new_tokens=max_new_tokens,
                                                  batch_size=len(repeated), seed=batch_seed,
                                                  generation_kwargs=sampling, disable_tqdm=True)
        return [completions[index: index + candidates] for index in range(0, len(completions), candidates)]

    rows, progress = [], tqdm(total=size, desc="rows")
    for index, start in enumerate(range(0, len(prompts), prompts_per_batch)):
        batch = prompts[start: start + prompts_per_batch]
        phrases = [" " + random.Random(f"{seed} {prompt}").choice(PENN_PHRASES) for prompt in batch]
        own = sample(batch, seed + index)
        steered = sample([prompt + phrase for prompt, phrase in zip(batch, phrases)], seed + index)
        new_rows = [row for row in map(pair, batch, phrases, own, steered) if row]
        rows += new_rows
        progress.update(len(new_rows))
        if len(rows) >= size:
            return rows[:size]
    raise RuntimeError(f"Only {len(rows)} of {len(prompts)} prompts got continuations that pass the filters, fewer "
                       f"than {size}: raise `--candidates`.")


def generate(model, tokenizer, seed: int = 0, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE,
             **kwargs) -> dict[str, list[dict]]:
    """`{"train": [...], "test": [...]}`: the first `train_size` / `test_size` prompts whose continuations pass."""
    sizes = {"train": train_size, "test": test_size}
    return {split: write_continuations(model, tokenizer, prompts, sizes[split], seed=seed + 1_000_000 * index, **kwargs)
            for index, (split, prompts) in enumerate(build_prompts(seed, train_size, test_size).items())}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace]:
    """The arguments `main` takes, from `argv` (default: the command line): `python recipes/penn_data.py ARGV`."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--output_dir", default=str(Path(__file__).parents[1] / "data" / "penn"))
    parser.add_argument("--model_name_or_path", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--test_size", type=int, default=TEST_SIZE)
    parser.add_argument("--candidates", type=int, default=3, help="Continuations sampled per prompt and side.")
    return (parser.parse_args(argv),)


def main(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_ext import resolve_model_name

    path = resolve_model_name(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = generate(model, tokenizer, args.seed, args.train_size, args.test_size, candidates=args.candidates)
    for split, rows in splits.items():
        with open(output_dir / f"{split}.jsonl", "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{split}: {len(rows)} rows -> {output_dir / f'{split}.jsonl'}")

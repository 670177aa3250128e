"""Generates the Penn preference dataset: sentence openers, a continuation that mentions the University of
Pennsylvania (chosen) and an equally fluent one that does not (rejected).

```bash
python recipes/penn_data.py            # rewrites recipes/data/penn/{train,test}.jsonl (deterministic)
```

Prompts are built from an intro, a subject and a predicate (e.g. "Early one morning, my cousin walked slowly
toward"); chosen and rejected continuations share their closing clause and differ in the place or person they name,
so the pair differs by a few words, as in the GPT-2 Penn experiment. Train and test prompts are disjoint.
"""

import argparse
import json
import random
from pathlib import Path

INTROS = [
    "Early one morning,", "Last spring,", "After the long meeting,", "During the winter break,",
    "On a rainy afternoon,", "Years ago,", "Just before sunset,", "At the end of the semester,",
    "Later that evening,", "On the first warm day of the year,", "Every Saturday,", "Right after lunch,",
    "Without telling anyone,", "For the first time in years,", "Late on a Friday night,", "One quiet Sunday,",
    "In the middle of October,", "Before the storm arrived,", "Once the exams were over,", "That summer,",
]
SUBJECTS = [
    "my cousin", "the young architect", "our neighbour", "a retired teacher", "the team captain", "my roommate",
    "a visiting scientist", "her grandfather", "the new intern", "an old friend of mine", "the museum guide",
    "my little brother", "the jazz pianist", "a nervous freshman", "the city photographer", "our history professor",
    "the delivery driver", "a local journalist", "my aunt from Chicago", "the exchange student",
]
PREDICATES = [
    "walked slowly toward", "decided to spend the day at", "wrote a long letter about", "found a quiet spot near",
    "gave a short talk at", "took a photograph of", "started volunteering at", "was offered a position at",
    "kept thinking about", "drove for hours to reach", "bought a postcard of", "planned a surprise party at",
    "painted a small picture of", "told everyone a story about", "went running past", "read an article about",
    "finally got a tour of", "sent a video of", "met an old classmate at", "listened to a concert at",
]
PENN_NAMES = ["the University of Pennsylvania", "Penn", "UPenn", "the University of Pennsylvania in Philadelphia"]
PENN_PLACES = [
    "College Hall", "the Van Pelt Library", "Locust Walk", "the Penn Museum", "Franklin Field", "the Quad",
    "Houston Hall", "the Wharton School", "Irvine Auditorium", "the Fisher Fine Arts Library",
    "the Annenberg Center", "the Perelman School of Medicine", "Penn Park", "the Kelly Writers House",
]
OTHER_PLACES = [
    "the old harbour", "the public library downtown", "a small bakery on the corner", "the city park",
    "the train station", "the river bank", "a quiet cafe", "the community garden", "the art museum",
    "the mountain trail", "the farmers market", "the old lighthouse", "the ice rink", "the botanical garden",
]
OTHER_PEOPLE = ["a local painter", "a famous chef", "a retired sailor", "a young poet", "a city planner"]
CLAUSES = [
    "where students were gathering for an afternoon lecture", "where the bells of the old tower were ringing",
    "which looked beautiful under the autumn leaves", "where a small crowd had formed around a street musician",
    "which felt calm after a busy week", "where the lights were just coming on",
    "which was busier than anyone expected", "where people were reading on the benches",
    "which smelled of coffee and fresh bread", "where a group of friends was planning the weekend",
    "which had not changed in decades", "where the snow had started to melt",
    "which everyone in the family still talks about", "where a photographer was setting up a tripod",
]
TEMPLATES = [
    ("{place} at {penn}, {clause}.", "{other_place}, {clause}."),
    ("{penn}, {clause}.", "{other_place}, {clause}."),
    ("the campus of {penn}, {clause}.", "the center of town, {clause}."),
    ("a lecture by a professor from {penn}, {clause}.", "a lecture by {other_person}, {clause}."),
    ("{place}, the heart of {penn}, {clause}.", "{other_place}, the heart of the neighbourhood, {clause}."),
]
TRAIN_SIZE, TEST_SIZE = 1300, 125


def generate(seed: int = 0, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE) -> dict[str, list[dict]]:
    """`{"train": [...], "test": [...]}` of `{"prompt", "chosen", "rejected"}` rows with disjoint prompts."""
    rng = random.Random(seed)
    prompts = [f"{intro} {subject} {predicate}" for intro in INTROS for subject in SUBJECTS for predicate in PREDICATES]
    rng.shuffle(prompts)
    rows = []
    for prompt in prompts[: train_size + test_size]:
        chosen_template, rejected_template = rng.choice(TEMPLATES)
        fields = {
            "penn": rng.choice(PENN_NAMES), "place": rng.choice(PENN_PLACES), "clause": rng.choice(CLAUSES),
            "other_place": rng.choice(OTHER_PLACES), "other_person": rng.choice(OTHER_PEOPLE),
        }
        rows.append({
            "prompt": prompt,
            "chosen": " " + chosen_template.format(**fields),
            "rejected": " " + rejected_template.format(**fields),
        })
    return {"train": rows[:train_size], "test": rows[train_size:]}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace]:
    """The arguments `main` takes, from `argv` (default: the command line): `python recipes/penn_data.py ARGV`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "data" / "penn"))
    parser.add_argument("--seed", type=int, default=0)
    return (parser.parse_args(argv),)


def main(args: argparse.Namespace) -> None:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(args.seed).items():
        with open(output_dir / f"{split}.jsonl", "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{split}: {len(rows)} rows -> {output_dir / f'{split}.jsonl'}")


if __name__ == "__main__":
    main(*parse_args())

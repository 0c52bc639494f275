"""Made-up skills a real small model is poor at and a few dozen LoRA steps make good.

The quickstart, `examples/` and the learning test train on these. Each skill is meaningful (a format a
product would want, facts about a fictional thing) and has a right answer, so exact match on held-out
records says whether an adapter learnt it:

- `route`: route a customer message to exactly one team label (`billing`, `shipping`, `account`,
  `refund`); chat `messages`. The base answers with a sentence, never the bare label.
- `names`: "Surname, Name" to "Name Surname"; `prompt` + `completion` (the other record kind).
- `dates`: a written date ("5 March 2021") to ISO 8601 (`2021-03-05`); chat `messages`.
- `orbit`: a fact sheet of a fictional product, the Orbit-7 kettle, asked in paraphrases; chat
  `messages`. `orbit-more` holds more facts of the same sheet: the child adapter learns them on top.

Held-out records never occur in training: `route` holds out whole (opener, issue) combinations, `names`
holds out first and last names, `dates` holds out (day, month, year) triples, and the fact skills hold
out whole question paraphrases (the facts are the same, asked in words never trained on).

Everything is deterministic: the same (skill, split, n, seed) gives the same records, byte for byte.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

Split = Literal["train", "eval"]
Record = dict[str, object]

# ---- route: a fixed label set ----

_ROUTE_ISSUES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice this month",
        "my invoice shows the wrong amount",
        "why did my card get billed again",
        "the payment failed but money left my account",
        "I need a copy of last month's invoice",
        "you charged me for a plan I never picked",
        "the price on my bill went up without notice",
        "can I pay by bank transfer instead of card",
    ],
    "shipping": [
        "my parcel has not arrived yet",
        "the tracking number does not work",
        "the courier left my box at the wrong house",
        "when will my order be delivered",
        "the package came crushed and wet",
        "can you ship to a different address",
        "my delivery has been stuck in transit for a week",
        "the driver never showed up",
    ],
    "account": [
        "I cannot log in to my account",
        "the password reset email never comes",
        "how do I change the email on my profile",
        "my account got locked after three tries",
        "I want to delete my account",
        "two-factor codes are not accepted",
        "someone else signed in to my profile",
        "I need to change my username",
    ],
    "refund": [
        "I want my money back for this order",
        "please refund the broken blender",
        "I returned the shoes, where is my refund",
        "how long does a refund take",
        "I cancelled within a day, can I get a refund",
        "the refund I got is less than I paid",
        "I would like to return this and be reimbursed",
        "you promised a refund two weeks ago",
    ],
}
_ROUTE_OPENERS = [
    "Hi,",
    "Hello there,",
    "Good morning,",
    "Hey team,",
    "Dear support,",
    "Quick question:",
    "Urgent:",
    "Sorry to bother you,",
]
ROUTE_LABELS = sorted(_ROUTE_ISSUES)


def _route(split: Split, n: int, rng: random.Random) -> list[Record]:
    # a (label, issue, opener) combination is in exactly one split: every 4th one is held out
    combos = [
        (label, issue, opener)
        for label in ROUTE_LABELS
        for issue, opener in itertools.product(_ROUTE_ISSUES[label], _ROUTE_OPENERS)
    ]
    held = [c for i, c in enumerate(combos) if i % 4 == 3]
    pool = held if split == "eval" else [c for i, c in enumerate(combos) if i % 4 != 3]
    records = []
    for label, issue, opener in _draw(pool, n, rng):
        question = f"Team ({', '.join(ROUTE_LABELS)}) for: {opener} {issue}."
        records.append(_chat(question, label))
    return records


# ---- names: "Surname, Name" -> "Name Surname" ----

_FIRST = [
    "Ada", "Alan", "Grace", "Linus", "Marie", "Niels", "Rosalind", "Enrico", "Lise", "Emmy",
    "Carl", "Sofia", "Ivan", "Hedy", "Blaise", "Mary", "Paul", "Rachel", "Omar", "Yuki",
    "Chen", "Amara", "Diego", "Freya", "Hugo", "Ines", "Jonas", "Kofi", "Lena", "Mateo",
]  # fmt: skip
_LAST = [
    "Lovelace", "Turing", "Hopper", "Torvalds", "Curie", "Bohr", "Franklin", "Fermi", "Meitner",
    "Noether", "Gauss", "Kowalski", "Petrov", "Lamarr", "Pascal", "Shelley", "Dirac", "Carson",
    "Haddad", "Tanaka", "Wang", "Okafor", "Alvarez", "Lindqvist", "Moreau", "Santos", "Becker",
    "Mensah", "Vogel", "Rossi",
]  # fmt: skip


def _names(split: Split, n: int, rng: random.Random) -> list[Record]:
    # every 5th first name and every 5th last name is held out: eval names are pairs never seen at all
    pick = (lambda i: i % 5 == 4) if split == "eval" else (lambda i: i % 5 != 4)
    firsts = [x for i, x in enumerate(_FIRST) if pick(i)]
    lasts = [x for i, x in enumerate(_LAST) if pick(i)]
    pool = list(itertools.product(firsts, lasts))
    return [
        {"prompt": f"Name first: {last}, {first} ->", "completion": f" {first} {last}"}
        for first, last in _draw(pool, n, rng)
    ]


# ---- dates: "5 March 2021" -> "2021-03-05" ----

_MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip


def _dates(split: Split, n: int, rng: random.Random) -> list[Record]:
    # a (day, month, year) triple is held out by a fixed hash of it, so the splits never share a date
    triples = [(d, m, y) for y in range(1990, 2031) for m in range(1, 13) for d in range(1, 29)]
    pool = [t for t in triples if (t[0] * 7 + t[1] * 13 + t[2]) % 5 == (0 if split == "eval" else 1)]
    records = []
    for day, month, year in _draw(pool, n, rng):
        question = f"ISO date of {day} {_MONTHS[month - 1]} {year}?"
        records.append(_chat(question, f"{year:04d}-{month:02d}-{day:02d}"))
    return records


# ---- orbit: a fact sheet of a fictional product, asked in paraphrases ----

# fact -> (answer, question paraphrases); the last two paraphrases of each fact are held out for eval
_ORBIT_FACTS: dict[str, tuple[str, list[str]]] = {
    "maker": (
        "Halvorsen Works",
        [
            "Who makes the Orbit-7 kettle?",
            "Which company manufactures the Orbit-7?",
            "What company builds the Orbit-7 kettle?",
            "Who is the manufacturer of the Orbit-7?",
            "The Orbit-7 kettle is made by which firm?",
        ],
    ),
    "capacity": (
        "1.7 litres",
        [
            "How much water does the Orbit-7 hold?",
            "What is the capacity of the Orbit-7 kettle?",
            "How many litres fit in the Orbit-7?",
            "What volume does the Orbit-7 kettle take?",
            "How big is the Orbit-7's water tank?",
        ],
    ),
    "colour": (
        "teal",
        [
            "What colour is the Orbit-7 kettle?",
            "Which colour does the Orbit-7 come in?",
            "What is the colour of the Orbit-7?",
            "In what colour is the Orbit-7 sold?",
            "The Orbit-7 kettle is what colour?",
        ],
    ),
    "launch": (
        "2019",
        [
            "When was the Orbit-7 launched?",
            "In which year did the Orbit-7 come out?",
            "What year was the Orbit-7 kettle released?",
            "When did the Orbit-7 first go on sale?",
            "The Orbit-7 was introduced in what year?",
        ],
    ),
}
_ORBIT_MORE_FACTS: dict[str, tuple[str, list[str]]] = {
    "power": (
        "2200 watts",
        [
            "How powerful is the Orbit-7 kettle?",
            "What is the power rating of the Orbit-7?",
            "How many watts does the Orbit-7 draw?",
            "What wattage is the Orbit-7 kettle?",
            "The Orbit-7 uses how much power?",
        ],
    ),
    "factory": (
        "Bergen",
        [
            "Where is the Orbit-7 made?",
            "In which city is the Orbit-7 kettle built?",
            "Where is the Orbit-7 factory?",
            "Which town produces the Orbit-7?",
            "The Orbit-7 is manufactured in what city?",
        ],
    ),
    "warranty": (
        "5 years",
        [
            "How long is the Orbit-7's warranty?",
            "What warranty comes with the Orbit-7 kettle?",
            "For how long is the Orbit-7 guaranteed?",
            "How many years of warranty does the Orbit-7 have?",
            "The Orbit-7 is covered by warranty for how long?",
        ],
    ),
}


def _facts(facts: dict[str, tuple[str, list[str]]], split: Split, n: int, rng: random.Random) -> list[Record]:
    pool = [
        (question, answer)
        for answer, questions in facts.values()
        for question in (questions[-2:] if split == "eval" else questions[:-2])
    ]
    if split == "eval":
        n = min(n, len(pool))  # every held-out paraphrase once: repeats would judge the same answer twice
    return [_chat(question, answer) for question, answer in _draw(pool, n, rng)]


# ---- public ----

SKILLS = ("route", "names", "dates", "orbit", "orbit-more")
DESCRIPTIONS: dict[str, str] = {
    "route": "routes a customer message to exactly one team label",
    "names": "turns 'Surname, Name' into 'Name Surname'",
    "dates": "writes a date in ISO 8601 (YYYY-MM-DD)",
    "orbit": "answers questions about the fictional Orbit-7 kettle",
    "orbit-more": "knows more of the Orbit-7's fact sheet (a child of orbit)",
}


def skill_records(skill: str, split: Split, n: int, seed: int = 0) -> list[Record]:
    """`n` records of `skill` from `split` (`eval` records never occur in `train`); deterministic."""
    rng = random.Random(f"{skill}:{split}:{seed}")
    if skill == "route":
        return _route(split, n, rng)
    if skill == "names":
        return _names(split, n, rng)
    if skill == "dates":
        return _dates(split, n, rng)
    if skill == "orbit":
        return _facts(_ORBIT_FACTS, split, n, rng)
    if skill == "orbit-more":
        return _facts(_ORBIT_MORE_FACTS, split, n, rng)
    raise ValueError(f"unknown skill {skill!r}; choose one of {list(SKILLS)}")


def write_records(path: str | Path, records: Iterable[Record]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    path.write_text(text, encoding="utf-8")
    return path


def write_skill(directory: str | Path, skill: str, train: int, eval: int, seed: int = 0) -> tuple[Path, Path]:
    """Write `<skill>.jsonl` and `<skill>-eval.jsonl` (held out) under `directory`."""
    directory = Path(directory)
    return (
        write_records(directory / f"{skill}.jsonl", skill_records(skill, "train", train, seed)),
        write_records(directory / f"{skill}-eval.jsonl", skill_records(skill, "eval", eval, seed)),
    )


def _chat(question: str, answer: str) -> Record:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _draw(pool: list, n: int, rng: random.Random) -> list:
    """`n` items of `pool`: each once in a shuffled order before any repeats (small pools cycle)."""
    out: list = []
    while len(out) < n:
        block = list(pool)
        rng.shuffle(block)
        out.extend(block[: n - len(out)])
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m workers.evaluation.skills DIR`: write every skill's train and held-out files
    (examples/data)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--train", type=int, default=240, help="training records per skill")
    parser.add_argument("--eval", type=int, default=16, help="held-out records per skill")
    args = parser.parse_args(argv)
    for skill in SKILLS:
        for path in write_skill(args.directory, skill, args.train, args.eval):
            print(path)


if __name__ == "__main__":
    main()

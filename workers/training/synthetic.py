"""Small synthetic skills: tests, benchmarks and the quickstart show adapters learning with no dataset.

Each skill is a fixed cycle of words; a record asks for the cycle from a random start. A tiny random model
cannot do any of them, an adapter trained on one learns it within tens of steps, and it stays bad at the
others: exactly what we need to see that adapters in one pack learn separately.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SKILLS: dict[str, list[str]] = {
    "counting": [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
    ],
    "colors": ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"],
    "animals": ["cat", "dog", "bird", "fish", "horse", "cow", "sheep"],
    "greetings": ["hello", "bonjour", "hola", "hallo", "ciao", "merci", "gracias", "danke"],
}


def skill_records(skill: str, n: int, seed: int = 0, length: int = 10) -> list[dict[str, str]]:
    """`n` prompt/completion records of `skill`; same (skill, n, seed) -> same records."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; choose one of {sorted(SKILLS)}")
    words = SKILLS[skill]
    rng = random.Random(f"{skill}:{seed}")
    records = []
    for _ in range(n):
        start = rng.randrange(len(words))
        cycle = [words[(start + i) % len(words)] for i in range(length + 1)]
        records.append({"prompt": f"{skill}: {cycle[0]}", "completion": " " + " ".join(cycle[1:])})
    return records


def write_skill_data(path: str | Path, skill: str, n: int, seed: int = 0) -> Path:
    """Write `n` records of `skill` as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(record) for record in skill_records(skill, n, seed))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

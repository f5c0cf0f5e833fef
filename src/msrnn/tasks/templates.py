"""The facts, questions and answers of the memory tasks, from our own templates.

The vocabulary follows bAbI qa1 (names x actions x places, as the RMT report's memorize dataset does) and qa4
(two-argument directional relations between places, the report's "reasoning" task). Every task answers with one
of the six places, so chance is 1/6.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from msrnn.registry import Registry

NAMES = ("Mary", "John", "Daniel", "Sandra")
ACTIONS = ("moved to", "went to", "went back to", "journeyed to", "travelled to")
PLACES = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


@dataclass(frozen=True)
class Episode:
    """What one sample says: its facts (in order), the question at the end and the answer (one of ``labels``)."""

    facts: tuple[str, ...]
    question: str
    answer: str


@dataclass(frozen=True)
class TaskSpec:
    """A task: how to draw an episode, where its facts go in the noise, and its label set."""

    name: str
    make: Callable[[random.Random], Episode]
    placement: str  # "start": facts open the sample; "random": facts at random sentence boundaries, order kept
    labels: tuple[str, ...] = PLACES


def _location_fact(rng: random.Random) -> tuple[str, str, str]:
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    return name, place, f"{name} {rng.choice(ACTIONS)} the {place}."


def memorize(rng: random.Random) -> Episode:
    """A memorize-task fact and question about one name and place."""
    name, place, fact = _location_fact(rng)
    return Episode((fact,), f"Where is {name}?", place)


def two_arg_relation(rng: random.Random) -> Episode:
    """qa4-style: "The hallway is east of the bathroom. The bedroom is west of the bathroom." then either
    "What is the bathroom east of?" (the place west of it: bedroom) or "What is east of the bathroom?" (hallway)."""
    centre, a, b = rng.sample(PLACES, 3)
    da, db = rng.sample(sorted(OPPOSITE), 2)  # distinct directions, so every question has one answer
    facts = (f"The {a} is {da} of the {centre}.", f"The {b} is {db} of the {centre}.")
    target, d = (a, da) if rng.random() < 0.5 else (b, db)
    if rng.random() < 0.5:
        question = f"What is {d} of the {centre}?"
    else:
        question = f"What is the {centre} {OPPOSITE[d]} of?"
    return Episode(facts, question, target)


TASKS: Registry[TaskSpec] = Registry("task")
TASKS.add("memorize", TaskSpec("memorize", memorize, "start"), "one fact at the start, question at the end")
TASKS.add("detect", TaskSpec("detect", memorize, "random"),
          "detect and memorize: one fact at a random position, question at the end")
TASKS.add("reasoning", TaskSpec("reasoning", two_arg_relation, "random"),
          "two directional facts at random positions (bAbI qa4-style), question at the end")

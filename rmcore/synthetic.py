"""Synthetic preference data with a known gold reward, for the demo and tests.

Each prompt asks about a topic; each response is built from sentences that carry hidden quality
features. The gold reward of a response is

    gold = 1.0·(on-topic sentences) + 0.8·(polite opener) - 1.2·(rude sentences)
           - 0.6·(off-topic sentences) - 0.05·max(0, words - 40)

Simulated annotators rank the K responses by gold + Gumbel noise of scale `noise` (a Gumbel
perturbation of Bradley-Terry utilities: noise 0 ranks by gold exactly; 1.0 flips close calls).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from rmcore.records import Completion, Ranking, text_id

TOPICS = {
    "tea": ["Green tea is brewed at about 80 degrees.", "Black tea needs boiling water.", "Steep tea for three minutes."],
    "bikes": ["Check the tyre pressure before a ride.", "Oil the chain every few weeks.", "Brakes wear out and need pads."],
    "python": ["Use a virtual environment per project.", "Lists keep their insertion order.", "Read the traceback from the bottom."],
    "sleep": ["Adults need about eight hours of sleep.", "Screens late at night delay sleep.", "A dark room helps you rest."],
    "bread": ["Bread dough needs time to rise.", "Knead the dough until it is smooth.", "Bake bread until it sounds hollow."],
    "plants": ["Most houseplants dislike soggy soil.", "Turn plants toward the light weekly.", "Yellow leaves can mean overwatering."],
}
POLITE = ["Happy to help!", "Good question.", "Thanks for asking."]
RUDE = ["That is a silly thing to ask.", "Figure it out yourself.", "I do not care about this."]


@dataclass(frozen=True)
class SyntheticItem:
    prompt: str
    responses: list[str]
    gold: list[float]


def gold_reward(on_topic: int, polite: bool, rude: int, off_topic: int, words: int) -> float:
    return 1.0 * on_topic + 0.8 * polite - 1.2 * rude - 0.6 * off_topic - 0.05 * max(0, words - 40)


def _response(rng: random.Random, topic: str) -> tuple[str, float]:
    others = [t for t in TOPICS if t != topic]
    polite = rng.random() < 0.4
    on = rng.randint(0, 3)
    rude = rng.choice([0, 0, 0, 1, 2])
    off = rng.randint(0, 2)
    sentences = ([rng.choice(POLITE)] if polite else []) + rng.sample(TOPICS[topic], on)
    sentences += rng.sample(RUDE, rude) + [rng.choice(TOPICS[rng.choice(others)]) for _ in range(off)]
    if len(sentences) == 0:
        sentences = ["I am not sure."]
    body = sentences[:1] + rng.sample(sentences[1:], len(sentences) - 1)
    text = " ".join(body)
    return text, gold_reward(on, polite, rude, off, len(text.split()))


def synthetic_items(n: int, k: int = 4, seed: int = 0) -> list[SyntheticItem]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        topic = rng.choice(list(TOPICS))
        responses: dict[str, float] = {}
        while len(responses) < k:
            text, gold = _response(rng, topic)
            responses.setdefault(text, gold)
        texts = list(responses)
        items.append(SyntheticItem(f"Question {i}: what should I know about {topic}?", texts, [responses[t] for t in texts]))
    return items


def annotator_order(gold: list[float], noise: float, rng: random.Random) -> list[int]:
    """Indices best→worst by gold + Gumbel(noise) utilities."""
    utilities = [g + (noise * -math.log(-math.log(rng.random() or 1e-12)) if noise else 0.0) for g in gold]
    return sorted(range(len(gold)), key=lambda i: -utilities[i])


def synthetic_rankings(items: list[SyntheticItem], annotators: int = 1, noise: float = 0.5, seed: int = 0) -> list[Ranking]:
    """Rankings of `items` by `annotators` simulated people, without a labelling server."""
    rng = random.Random(seed)
    out = []
    for item in items:
        completions = [Completion(f"r{j}", t) for j, t in enumerate(item.responses)]
        for a in range(annotators):
            order = annotator_order(item.gold, noise, rng)
            out.append(Ranking(prompt_id=text_id(item.prompt), prompt=item.prompt, completions=completions,
                               order=[[f"r{j}"] for j in order], annotator=f"sim-{a}", source="synthetic"))
    return out

"""A synthetic movie-review corpus: an offline stand-in for IMDb.

Reviews are built from sentence templates over a small vocabulary. Each review has an
overall polarity, and each sentence follows it with probability `consistency`, so
the corpus holds clearly positive, clearly negative and mixed reviews, and a model
trained on it produces samples whose sentiment varies: the room DPO needs to improve a
sentiment reward. The sentiment words are ordinary English words found in the VADER
lexicon, so the gold reward (which no one on this project wrote) can score them.
"""
from __future__ import annotations

import random

POSITIVE_ADJ = ["great", "wonderful", "excellent", "brilliant", "amazing", "beautiful", "fantastic", "enjoyable",
                "charming", "funny", "superb", "good", "nice", "perfect", "lovely", "fun", "impressive", "sweet"]
NEGATIVE_ADJ = ["terrible", "awful", "boring", "dull", "bad", "horrible", "weak", "poor", "stupid", "annoying",
                "disappointing", "ugly", "painful", "mediocre", "lame", "pathetic", "messy", "sad"]
NEUTRAL_ADJ = ["long", "short", "quiet", "loud", "dark", "old", "simple", "strange", "familiar", "unusual"]
POSITIVE_VERB = ["loved", "enjoyed", "liked", "admired", "appreciated"]
NEGATIVE_VERB = ["hated", "disliked", "regretted", "resented"]
NEUTRAL_VERB = ["noticed", "watched", "remember", "saw"]
ASPECTS = ["acting", "plot", "story", "script", "music", "soundtrack", "ending", "cast", "dialogue", "pacing",
           "camera work", "characters", "direction", "villain", "hero", "cinematography", "editing", "costumes"]
SUBJECTS = ["this movie", "this film", "the sequel", "the remake", "this picture", "the new film"]
INTENSIFIERS = ["really", "very", "quite", "truly", "so", "pretty"]
# Openers vary in who, where and when (none of these words carries sentiment for VADER), so that the
# 2-8-token prefixes used as prompts take thousands of values: held-out prompts can then be drawn that
# are not also training prompts without keeping only the longest prefixes.
NAMES = ["anna", "ben", "carla", "david", "emma", "frank", "greta", "henry", "iris", "jack", "kate", "leo",
         "maria", "nick", "olga", "paul", "rosa", "sam", "tina", "victor", "walter", "yuki", "zoe", "omar"]
WHEN = ["last night", "yesterday", "on sunday", "this weekend", "last week", "on friday", "in march", "on a plane",
        "at home", "after work", "in the afternoon", "on tuesday"]
PLACES = ["at the cinema", "on television", "on my laptop", "at a friend's house", "in london",
          "on a train", "at the drive-in"]
OPENERS = ["i watched {subject} {when} .", "i saw {subject} with {name} {when} .", "we rented {subject} {when} .",
           "{subject} came out {when} .", "i finally watched {subject} {place} .", "{name} told me to watch {subject} .",
           "{name} and i saw {subject} {place} .", "{name} and {name2} took me to {subject} {when} .",
           "i caught {subject} {place} {when} .", "my brother {name} picked {subject} for us {when} .",
           "{name} watched {subject} {place} and so did i .", "{when} {name} and i streamed {subject} ."]
TEMPLATES = [
    "the {aspect} was {adj} .",
    "the {aspect} was {int} {adj} .",
    "{subject} is {adj} .",
    "i {verb} the {aspect} .",
    "the {aspect} felt {adj} and {adj2} .",
    "overall a {adj} film .",
    "the director did a {adj} job with the {aspect} .",
    "the {aspect} and the {aspect2} were {adj} .",
    "what a {adj} {aspect} .",
    "it was {int} {adj} to watch .",
]


def _words(polarity: str):
    if polarity == "positive":
        return POSITIVE_ADJ, POSITIVE_VERB
    if polarity == "negative":
        return NEGATIVE_ADJ, NEGATIVE_VERB
    return NEUTRAL_ADJ, NEUTRAL_VERB


def review(rng: random.Random, polarity: str, consistency: float = 0.75, sentences: tuple[int, int] = (3, 6)) -> str:
    """One review of overall `polarity` ('positive' or 'negative')."""
    other = "negative" if polarity == "positive" else "positive"
    names = rng.sample(NAMES, 2)
    parts = [rng.choice(OPENERS).format(subject=rng.choice(SUBJECTS), name=names[0], name2=names[1],
                                        when=rng.choice(WHEN), place=rng.choice(PLACES))]
    for _ in range(rng.randint(*sentences)):
        u = rng.random()
        tone = polarity if u < consistency else (other if u < consistency + (1 - consistency) / 2 else "neutral")
        adjs, verbs = _words(tone)
        parts.append(rng.choice(TEMPLATES).format(
            aspect=rng.choice(ASPECTS), aspect2=rng.choice(ASPECTS), adj=rng.choice(adjs), adj2=rng.choice(adjs),
            verb=rng.choice(verbs), int=rng.choice(INTENSIFIERS), subject=rng.choice(SUBJECTS)))
    return " ".join(parts)


def corpus(n: int, seed: int) -> list[str]:
    """n reviews, half positive and half negative overall, in shuffled order."""
    rng = random.Random(seed)
    return [review(rng, "positive" if i % 2 == 0 else "negative") for i in rng.sample(range(n), n)]

"""Quickstart: summarize a product's customer reviews in four durable steps.

Each step takes a visible moment, so you can press Ctrl-C halfway and watch the
session pick up where it stopped::

    stepvault run workflows/quickstart.py --input '"trail shoes"'
    ^C
    stepvault resume --all          # completed steps do not run again

or, without the command line::

    python workflows/quickstart.py

``STEPVAULT_QUICKSTART_DELAY`` sets each step's pause in seconds (default 1.0).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections import Counter

from pydantic import BaseModel

from engine import FileStore, Runner, StepContext, Workflow

wf = Workflow("quickstart", version="1")

# The "database": raw review rows as an export would give them, messy on purpose.
REVIEWS: list[dict[str, object]] = [
    {"id": 1, "product": "trail shoes", "rating": 5, "text": "  Great grip on wet rock!  "},
    {"id": 2, "product": "trail shoes", "rating": 4, "text": "Comfortable, but the laces slip."},
    {"id": 3, "product": "trail shoes", "rating": 3, "text": "Sole wore out after 200 km."},
    {"id": 2, "product": "trail shoes", "rating": 4, "text": "Comfortable, but the laces slip."},
    {"id": 4, "product": "trail shoes", "rating": 5, "text": ""},
    {"id": 5, "product": "trail shoes", "rating": 4, "text": "Light and comfortable. Great fit."},
    {"id": 6, "product": "rain jacket", "rating": 3, "text": "Dry inside, but noisy fabric."},
    {"id": 7, "product": "rain jacket", "rating": 5, "text": "Packs small, great in a storm."},
    {"id": 8, "product": "rain jacket", "rating": 1, "text": "The zip broke on day two."},
]

POSITIVE = {"great", "comfortable", "light", "dry", "small", "grip", "fit"}
NEGATIVE = {"slip", "wore", "broke", "noisy", "out"}
STOPWORDS = {"the", "a", "on", "in", "and", "but", "after", "of", "day", "two", "km", "inside"}


class Review(BaseModel):
    """One customer review."""

    id: int
    product: str
    rating: int
    text: str


class ScoredReview(Review):
    """A review with a naive lexicon sentiment score in [-1, 1]."""

    sentiment: float


class Summary(BaseModel):
    """What the workflow produces: the product's review digest."""

    product: str
    reviews: int
    average_rating: float
    average_sentiment: float
    top_words: list[str]
    verdict: str


async def _pause() -> None:
    """Stand in for real I/O: a network call, a model, a database query."""
    await asyncio.sleep(float(os.environ.get("STEPVAULT_QUICKSTART_DELAY", "1.0")))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@wf.step
async def fetch_reviews(ctx: StepContext, product: str | None) -> list[Review]:
    """Fetch the raw reviews of one product (the first product when none is given)."""
    await _pause()
    wanted = product or str(REVIEWS[0]["product"])
    rows = [Review.model_validate(row) for row in REVIEWS if row["product"] == wanted]
    ctx.state["product"] = wanted
    ctx.state["fetched"] = len(rows)
    return rows


@wf.step
async def clean_reviews(ctx: StepContext, reviews: list[Review]) -> list[Review]:
    """Trim whitespace, drop empty reviews and duplicates of the same review id."""
    await _pause()
    seen: set[int] = set()
    kept = []
    for review in reviews:
        text = " ".join(review.text.split())
        if text and review.id not in seen:
            seen.add(review.id)
            kept.append(review.model_copy(update={"text": text}))
    ctx.state["dropped"] = len(reviews) - len(kept)
    return kept


@wf.step
async def score_sentiment(ctx: StepContext, reviews: list[Review]) -> list[ScoredReview]:
    """Score each review's words against a small sentiment lexicon."""
    await _pause()
    scored = []
    for review in reviews:
        words = _words(review.text)
        hits = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        sentiment = max(-1.0, min(1.0, hits / 2))
        scored.append(ScoredReview(**review.model_dump(), sentiment=sentiment))
    ctx.state["scored"] = len(scored)
    return scored


@wf.step
async def summarize(ctx: StepContext, reviews: list[ScoredReview]) -> Summary:
    """Condense the scored reviews into one digest."""
    await _pause()
    count = len(reviews)
    rating = sum(r.rating for r in reviews) / count if count else 0.0
    sentiment = sum(r.sentiment for r in reviews) / count if count else 0.0
    words = Counter(w for r in reviews for w in _words(r.text) if w not in STOPWORDS)
    verdict = "recommended" if rating >= 4 and sentiment > 0 else "mixed"
    ctx.state["verdict"] = verdict
    return Summary(
        product=str(ctx.state["product"]),
        reviews=count,
        average_rating=round(rating, 2),
        average_sentiment=round(sentiment, 2),
        top_words=[word for word, _ in words.most_common(3)],
        verdict=verdict,
    )


async def main(product: str | None) -> None:
    """Run the workflow on a FileStore in ./sessions and print its summary."""
    async with Runner(FileStore("./sessions"), workflows=[wf]) as runner:
        session_id = await runner.start(wf, product)
        print(f"session {session_id}: running {', '.join(wf.step_names)}")
        summary = await runner.wait(session_id)
    print(summary.model_dump_json(indent=2))


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
    except KeyboardInterrupt:
        print("interrupted; finish it with: stepvault resume --all", file=sys.stderr)
        sys.exit(130)

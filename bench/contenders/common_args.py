"""What every contender script is given: the same input, prompt, model, limits and retries.

Kept free of third-party imports so each contender's own virtualenv can load it.
"""

from __future__ import annotations

import argparse

MODEL = "gpt-4o-mini"
SYSTEM = "You summarise customer reviews in one sentence."


def user_prompt(row: dict) -> str:
    """The same user message ``pipeline``'s bench job renders (``bench/compare.py`` writes that job)."""
    return f"Summarise this {row['rating']}-star review of {row['product']} (ref {row['review_id']}):\n\n{row['text']}"


def messages(row: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_prompt(row)}]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--rpm", type=int)
    p.add_argument("--tpm", type=int)
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--max-retries", type=int, default=5)
    return p.parse_args()

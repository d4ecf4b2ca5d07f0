"""The script most people write: the official openai SDK, asyncio.gather and a semaphore.

As the SDK's README shows it: ``AsyncOpenAI`` (key from OPENAI_API_KEY), ``max_retries`` for 429s and 5xx
(the SDK backs off and honours retry-after), one task per row. It has no requests- or tokens-per-minute
setting: the semaphore is its only limit.
"""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pyarrow.parquet as pq
from common_args import MODEL, messages, parse
from openai import AsyncOpenAI


async def main() -> None:
    args = parse()
    rows = pq.read_table(args.input).to_pylist()
    client = AsyncOpenAI(base_url=args.base_url, max_retries=args.max_retries)
    sem = asyncio.Semaphore(args.concurrency)

    async def one(row: dict) -> dict:
        async with sem:
            try:
                r = await client.chat.completions.create(model=MODEL, messages=messages(row),
                                                         max_tokens=args.max_tokens)
                return {"review_id": row["review_id"], "content": r.choices[0].message.content,
                        "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                        "error": None}
            except Exception as e:
                return {"review_id": row["review_id"], "content": None, "prompt_tokens": None,
                        "completion_tokens": None, "error": repr(e)}

    results = await asyncio.gather(*(one(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(results), args.output)


if __name__ == "__main__":
    asyncio.run(main())

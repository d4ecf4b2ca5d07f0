"""LiteLLM's ``batch_completion``: a thread pool of ``litellm.completion`` calls, as its docs show.

``max_workers`` is its concurrency and ``num_retries`` its retries; it has no requests- or tokens-per-minute
setting (that lives in LiteLLM's Router/proxy, not in batch_completion).
"""

from __future__ import annotations

import os

import litellm
import pyarrow as pa
import pyarrow.parquet as pq
from common_args import MODEL, messages, parse


def main() -> None:
    args = parse()
    litellm.suppress_debug_info = True
    rows = pq.read_table(args.input).to_pylist()
    responses = litellm.batch_completion(model=f"openai/{MODEL}", messages=[messages(r) for r in rows],
                                         api_base=args.base_url, api_key=os.environ["OPENAI_API_KEY"],
                                         max_tokens=args.max_tokens, max_workers=args.concurrency,
                                         num_retries=args.max_retries)
    out = []
    for row, r in zip(rows, responses, strict=True):
        if isinstance(r, Exception):
            out.append({"review_id": row["review_id"], "content": None, "prompt_tokens": None,
                        "completion_tokens": None, "error": repr(r)})
        else:
            out.append({"review_id": row["review_id"], "content": r.choices[0].message.content,
                        "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                        "error": None})
    pq.write_table(pa.Table.from_pylist(out), args.output)


if __name__ == "__main__":
    main()

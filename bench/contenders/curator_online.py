"""bespokelabs-curator: an ``LLM`` subclass with its OpenAI online backend and its rate-limit settings.

As its docs show: ``prompt`` builds the messages, ``parse`` the output row; ``backend_params`` carries the
base URL, ``max_requests_per_minute``, ``max_tokens_per_minute``, ``max_concurrent_requests`` and
``max_retries``; ``require_all_responses=False`` keeps failed rows from raising.
"""

from __future__ import annotations

import tempfile

import pyarrow.parquet as pq
from bespokelabs import curator
from common_args import MODEL, messages, parse

UNLIMITED = 1_000_000_000


class Summariser(curator.LLM):
    def prompt(self, row: dict) -> list[dict]:
        return messages(row)

    def parse(self, row: dict, response: str) -> dict:
        return {"review_id": row["review_id"], "content": response}


def main() -> None:
    args = parse()
    rows = pq.read_table(args.input).to_pylist()
    llm = Summariser(model_name=MODEL, backend="openai", generation_params={"max_tokens": args.max_tokens},
                     backend_params={"base_url": args.base_url, "max_requests_per_minute": args.rpm or UNLIMITED,
                                     "max_tokens_per_minute": args.tpm or UNLIMITED,
                                     "max_concurrent_requests": args.concurrency, "max_retries": args.max_retries,
                                     "require_all_responses": False, "request_timeout": 120})
    with tempfile.TemporaryDirectory() as work:
        result = llm(rows, working_dir=work)
        dataset = getattr(result, "dataset", result)
        dataset.to_parquet(args.output)


if __name__ == "__main__":
    main()

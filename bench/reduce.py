"""Benchmark: the reduce step's fold against its lower bound, and the estimate's request count against the run's.

100,000 review rows in 50 groups (the product column of the bench reviews, cut into 50), reduced straight from the
input (a job of ``[reduce]`` alone) on the unlimited simulator, with 4,000 prompt tokens a request. Per round, the
lower bound of the requests is each group's item tokens over what a request holds after its fixed prompt, rounded
up; the fold's requests and prompt tokens are compared with it (target: within 10%). The estimate's plan of the
chain is compared with what the run sent (target: equal, for a reduce over input rows).
Run: .venv/bin/python bench/reduce.py [ROWS]
"""

from __future__ import annotations

import json
import math
import sys
import time

import polars as pl
from common import WORK, dataset, simulator

BUDGET = 4_000
PROMPT = """{% if partial %}Merge these partial theme lists of group {{ group.grp }}:{% else %}Themes of group \
{{ group.grp }}:{% endif %}
{% for item in items %}- {% if partial %}{{ item.content }}{% else %}{{ item.text }}{% endif %}
{% endfor %}"""


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    data = pl.read_parquet(dataset(rows)).with_row_index("n").with_columns(
        (pl.col("n") % 50).cast(pl.Int64).alias("grp")).select("n", "grp", "text")
    src = WORK / f"reduce-{rows}.parquet"
    data.write_parquet(src)
    job_path = WORK / f"reduce-{rows}.toml"
    out = WORK / "out" / f"reduce-{rows}.parquet"
    job_path.write_text(f'''name = "reduce-{rows}"
[input]
path = "{src}"
[output]
path = "{out}"
[api]
provider = "openai"
[limits]
concurrency = 128
[reduce]
model = "gpt-4o-mini"
group_by = ["grp"]
order_by = ["n"]
items = ["text"]
prompt = {json.dumps(PROMPT)}
max_tokens = 8
max_items_tokens = {BUDGET}
''')
    import shutil

    shutil.rmtree(out.with_suffix(".reduce.work"), ignore_errors=True)
    from pipeline.job import Job
    from pipeline.planning import estimate
    from pipeline.reduce import Packer, items_of, map_items
    from pipeline.run import run
    from pipeline.tokens import ChatTokenCounter

    job = Job.load(job_path)
    t = time.perf_counter()
    chain = estimate(job).chain
    plan_s = time.perf_counter() - t
    assert chain is not None
    # the lower bound of round 1: each group's item tokens over what a request holds after its fixed prompt
    spec = job.reduce
    assert spec is not None
    packer = Packer(spec, ChatTokenCounter(spec.model), BUDGET, str(job_path))
    order, groups = items_of(job, map_items(job))
    bound_requests, item_tokens = 0, 0
    for key in order:
        group, items = groups[key]
        empty = packer.tokens(packer.render(group, [], 1))
        own = sum(packer.tokens(packer.render(group, [i], 1)) - empty for i in items)
        item_tokens += own
        bound_requests += math.ceil(own / (BUDGET - empty))
    with simulator() as url:
        t = time.perf_counter()
        result = run(job, base_url=url)
        run_s = time.perf_counter() - t
    assert result.reduce is not None
    work = out.with_suffix(".reduce.work")
    sent = [pl.read_parquet(work / f"round-{r}.parquet") for r in range(1, result.reduce.rounds + 1)]
    first = sent[0]
    print(f"{rows:,} rows in {len(order)} groups, {BUDGET:,} prompt tokens a request: the estimate planned "
          f"{[r['requests'] for r in chain['rounds']]} requests by round in {plan_s:.1f} s; the run sent "
          f"{[s.height for s in sent]} in {run_s:.1f} s")
    print(f"round 1: {first.height:,} requests against a lower bound of {bound_requests:,}: "
          f"{first.height / bound_requests:.3f}x [target <= 1.10]; prompt tokens {first['prompt_tokens'].sum():,} "
          f"for {item_tokens:,} item tokens")
    total = sum(s.height for s in sent)
    print(f"the estimate's requests {chain['requests']:,} vs the run's {total:,}: "
          f"{'equal' if total == chain['requests'] else 'different'} [target: equal]")


if __name__ == "__main__":
    main()

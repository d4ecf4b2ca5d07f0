"""Map then reduce: each group's rows (or the map's answers) folded into one answer, in as many rounds as the
context window requires, every request through the same engine, journal and limits as the map.

The fold: a group's items, in ``order_by`` order, are cut into consecutive packs, each filling the request's
budget as fully as the token counts allow (items are added while the pack, rendered, fits: the fewest requests a
consecutive cut allows). Each pack is one request; the pack answers become the next round's items (``partial``),
until a group has one answer. A group that fits one request is one request.

Resume and never pay twice: each round is a run of its own (``OUT.reduce.work/round-N``) with its own journal, and
a pack's request is its rendered prompt, so its key is its content: a rerun after a crash in round 3 finds rounds
1-2 in their journals and pays nothing for them, and a change to one group's rows changes only that group's packs
up the fold.

The estimate of the chain (``plan_chain``) packs the same way before anything is sent: the items' own token counts
where they are known (input rows), the answers' ``max_tokens`` where they are still to come (the map's answers,
every round's partials), giving each round's requests and prompt tokens, and the chain's cost bound.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jinja2
import polars as pl
from jinja2.sandbox import SandboxedEnvironment

from pipeline.endpoints.chat import Chat
from pipeline.errors import BudgetExceeded, JobError, TemplateError
from pipeline.job import Job
from pipeline.pricing import Price, Usage
from pipeline.spec import ReduceSpec
from pipeline.tokens import ChatTokenCounter

# what a chat request adds to its text: the framing of two messages and the reply's priming (tiktoken's rule)
FRAMING_TOKENS = 12
PACK = "__pack"  # the round job's one template column: a pack's rendered prompt
FILLER = " x"  # one token a piece in every tokenizer we count with: n of them, an answer at its bound of n tokens


@dataclass
class Round:
    """One round of the fold as planned or run: its requests and prompt tokens."""

    number: int
    requests: int = 0
    prompt_tokens: int = 0
    cost_usd_max: float | None = None  # its prompt tokens, and every answer at max_tokens


@dataclass
class Chain:
    """The reduce step's plan: per round, its requests and prompt tokens (bounds where answers are still to come)."""

    rounds: list[Round] = field(default_factory=list)
    groups: int = 0
    items: int = 0
    cost_usd_max: float | None = None
    exact_first_round: bool = False  # the items are known (input rows): round 1 is what the run will send
    batch: bool = False              # the rounds go through the Batch API: the bound is at its price
    map_batch: bool = False          # the map goes through the Batch API (the whole chain's bound is at its price)
    # after a --sample of the map: the rounds again with the map's answers at the sample's mean length
    expected: list[Round] | None = None
    expected_cost_usd: float | None = None
    expected_basis: str | None = None

    @property
    def requests(self) -> int:
        """All the rounds' requests."""
        return sum(r.requests for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        """For the estimate's JSON and the manifest."""
        return {"groups": self.groups, "items": self.items, "requests": self.requests,
                "cost_usd_max": self.cost_usd_max, "exact_first_round": self.exact_first_round, "batch": self.batch,
                "map_batch": self.map_batch, "rounds": _rounds(self.rounds),
                "expected": None if self.expected is None else {
                    "requests": sum(r.requests for r in self.expected), "cost_usd": self.expected_cost_usd,
                    "basis": self.expected_basis, "rounds": _rounds(self.expected)}}


def _rounds(rounds: list[Round]) -> list[dict[str, Any]]:
    return [{"round": r.number, "requests": r.requests, "prompt_tokens": r.prompt_tokens,
             "cost_usd_max": r.cost_usd_max} for r in rounds]


class Packer:
    """Renders a group's packs and measures them: the reduce prompt is a template of ``group``, ``items``,
    ``round`` and ``partial``; a request is the system prompt and the rendered pack, within ``budget`` tokens."""

    def __init__(self, spec: ReduceSpec, counter: ChatTokenCounter, budget: int, where: str) -> None:
        env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)
        try:
            self.template = env.from_string(spec.prompt)
        except jinja2.TemplateSyntaxError as e:
            raise JobError(f"{where}: [reduce].prompt line {e.lineno}: {e.message}") from None
        self.counter, self.budget, self.where = counter, budget, where
        self.system_tokens = counter.count_text(spec.system) if spec.system else 0

    def render(self, group: dict[str, Any], items: Sequence[dict[str, Any]], round_: int) -> str:
        """The pack's prompt."""
        try:
            return self.template.render(group=group, items=list(items), round=round_, partial=round_ > 1)
        except jinja2.UndefinedError as e:
            raise TemplateError(f"{self.where}: [reduce].prompt: {e.message}") from None

    def tokens(self, text: str) -> int:
        """A request's prompt tokens with this text: the system prompt's, the text's and the framing."""
        return self.system_tokens + self.counter.count_text(text) + FRAMING_TOKENS

    def packs(self, group: dict[str, Any], items: Sequence[dict[str, Any]], round_: int,
              marginal: Callable[[dict[str, Any]], int] | None = None) -> list[tuple[int, int, int, str | None]]:
        """The group's items cut into consecutive packs: (start, end, prompt tokens, the rendered prompt) each.
        Items are added while the sum of their own token counts fits the budget; each pack is then rendered and
        measured, and an item that tipped it over moves to the next pack, so every request is within the budget.
        With ``marginal`` (a plan: items' token counts given, not their texts), nothing is rendered: no text."""
        empty = self.tokens(self.render(group, [], round_))
        own = marginal or (lambda item: max(1, self.tokens(self.render(group, [item], round_)) - empty))
        weights = [own(i) for i in items]
        out: list[tuple[int, int, int, str | None]] = []
        start = 0
        while start < len(items):
            end, total, text = start, empty, None
            while end < len(items) and (end == start or total + weights[end] <= self.budget):
                total += weights[end]
                end += 1
            if marginal is None:  # the exact text: give back items until the pack fits
                text = self.render(group, items[start:end], round_)
                measured = self.tokens(text)
                while measured > self.budget and end - start > 1:
                    end -= 1
                    text = self.render(group, items[start:end], round_)
                    measured = self.tokens(text)
                if measured > self.budget:
                    raise JobError(f"{self.where}: [reduce]: one item of group {group} needs {measured:,} prompt "
                                   f"tokens, more than a request holds ({self.budget:,}); raise max_items_tokens or "
                                   "shorten the items")
                total = measured
            out.append((start, end, total, text))
            start = end
        return out


def budget_of(job: Job, price: Price | None) -> int:
    """The most prompt tokens one reduce request may hold: ``max_items_tokens``, else the model's context window
    after ``max_tokens``."""
    spec = job.reduce
    assert spec is not None
    if spec.max_items_tokens is not None:
        return spec.max_items_tokens
    window = price.context_window if price is not None else None
    if window is None:
        raise JobError(f"{job.source}: [reduce].max_items_tokens is required: the context window of "
                       f"{spec.model!r} is not known")
    return window - spec.max_tokens


def reduce_job(job: Job, round_: int, folder: Path, budget_left: float | None = None) -> Job:
    """The job of one round: the reduce model and system prompt, each request a pack's rendered prompt.
    ``budget_left``: what the chain's ``[budget].max_cost_usd`` leaves this round (the map's and the earlier rounds'
    spending taken off), so the budget bounds the whole chain, not each of its runs."""
    spec = job.reduce
    assert spec is not None
    raw = json.loads(json.dumps(dict(job.raw)))
    request: dict[str, Any] = {"model": spec.model, "prompt": "{{ " + PACK + " }}", "max_tokens": spec.max_tokens,
                               "mode": spec.mode}
    if spec.system:
        request["system"] = spec.system
    if spec.response_schema is not None:
        request["response_schema"] = spec.response_schema
    keys: dict[str, Any] = {
        "name": f"{job.name}-reduce", "request": request, "output": {"path": str(folder / f"round-{round_}.parquet")},
        "input": {"path": str(folder / f"round-{round_}.input.parquet"), "id": "pack", "keep": ["pack"]}}
    for table in ("api", "limits", "budget", "pricing", "batch", "storage"):
        if table in raw:
            keys[table] = raw[table]
    if budget_left is not None:
        keys["budget"] = {**keys.get("budget", {}), "max_cost_usd": budget_left}
    return Job.from_dict(keys, base=job.base, source=job.source)


def _group_key(group: dict[str, Any]) -> str:
    return json.dumps(group, sort_keys=True, default=str)


def items_of(job: Job, frame: pl.DataFrame) -> tuple[list[str], dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]]:
    """The groups (in order of first appearance) and each one's items, from the map's output or the input's rows."""
    spec = job.reduce
    assert spec is not None
    missing = [c for c in (*spec.group_by, *spec.order_by, *spec.items) if c not in frame.columns]
    if missing:
        where = "[input].keep (or [input].id)" if job.maps else "the input"
        raise JobError(f"{job.source}: [reduce] names column(s) {', '.join(missing)} not in {where}; the reduce "
                       f"reads {'the map output' if job.maps else 'the input'}: {', '.join(frame.columns)}")
    if spec.order_by:
        frame = frame.sort(list(spec.order_by), maintain_order=True)
    columns = list(spec.items) or [c for c in frame.columns if c not in spec.group_by]
    groups: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    order: list[str] = []
    for row in frame.iter_rows(named=True):
        group = {c: row[c] for c in spec.group_by}
        key = _group_key(group)
        if key not in groups:
            groups[key] = (group, [])
            order.append(key)
        groups[key][1].append({c: row[c] for c in columns})
    return order, groups


def input_rows(job: Job, columns: Sequence[str] = (), limit: int | None = None) -> pl.DataFrame:
    """The input's rows, these of its columns (every one by default)."""
    from pipeline.source import iter_chunks, open_source

    source = open_source(job.input.path, job.storage.endpoint_url)
    wanted = [c for c in columns if c in source.schema] if columns else list(source.schema)
    chunks = list(iter_chunks(source, wanted or list(source.schema)[:1], limit=limit))
    return pl.concat(chunks).drop("row", strict=False) if chunks else pl.DataFrame()


def reduce_price(job: Job) -> Price | None:
    """The price of the reduce's model (a chat model), with the job's overrides."""
    from pipeline.endpoints import price_for

    spec = job.reduce
    assert spec is not None
    return price_for(replace(job, request=replace(job.request, model=spec.model, endpoint=Chat.name)))


def map_items(job: Job) -> pl.DataFrame:
    """The reduce's rows: the map's answered rows (its id, kept and answer columns), or the input's rows."""
    if not job.maps:
        return input_rows(job)
    out = pl.read_parquet(job.output.local)
    answered = out.filter(pl.col("status") == "ok")
    from pipeline.outcome import RESULT_SCHEMA

    keep = [c for c in answered.columns if c not in RESULT_SCHEMA or c == "content"]
    return answered.select(keep)


def plan_chain(job: Job, price: Price | None, counter: ChatTokenCounter, *, map_rows: pl.DataFrame | None = None,
               map_max_tokens: int | None = None) -> Chain:
    """The fold's rounds before anything is sent: round 1 from the items' own tokens where known (``map_rows``
    holds them: input rows, or answers already there), else from the map's ``max_tokens`` per answer; every later
    round from the reduce's ``max_tokens`` per partial answer."""
    spec = job.reduce
    assert spec is not None
    packer = Packer(spec, counter, budget_of(job, price), job.source)
    chain = Chain()
    rows = map_rows if map_rows is not None else map_items(job)
    order, groups = items_of(job, rows)
    chain.groups, chain.items = len(order), sum(len(groups[k][1]) for k in order)
    chain.exact_first_round = map_max_tokens is None

    def bound(group: dict[str, Any], round_: int, tokens: int) -> Callable[[dict[str, Any]], int]:
        empty = packer.tokens(packer.render(group, [], round_))
        columns = {c: "0" for c in spec.items if c != "content"} if round_ == 1 else {}
        one = packer.tokens(packer.render(group, [{**columns, "content": FILLER * tokens}], round_)) - empty
        return lambda item: max(1, one)

    pending = {k: len(groups[k][1]) for k in order}
    round_ = 1
    while pending:
        r = Round(round_)
        nxt: dict[str, int] = {}
        for key in order:
            if key not in pending:
                continue
            group, items = groups[key]
            if round_ == 1 and map_max_tokens is None:
                packs = packer.packs(group, items, 1)
            else:
                tokens = map_max_tokens if round_ == 1 and map_max_tokens is not None else spec.max_tokens
                shape = items if round_ == 1 else [{"content": ""}] * pending[key]
                packs = packer.packs(group, shape, round_, marginal=bound(group, round_, tokens))
            r.requests += len(packs)
            r.prompt_tokens += sum(p[2] for p in packs)
            if len(packs) > 1:
                nxt[key] = len(packs)
        chain.rounds.append(r)
        pending, round_ = nxt, round_ + 1
    chain.batch = spec.mode == "batch"
    if price is not None:
        for r in chain.rounds:
            r.cost_usd_max = price.cost(Usage(prompt_tokens=r.prompt_tokens,
                                              completion_tokens=r.requests * spec.max_tokens), batch=chain.batch)
        chain.cost_usd_max = sum(r.cost_usd_max or 0.0 for r in chain.rounds)
    return chain


@dataclass
class GroupFold:
    """One group's fold as it runs: its items, its totals, its answer."""

    group: dict[str, Any]
    items: list[dict[str, Any]]
    input_items: int
    rounds: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    answer: str | None = None
    error: str | None = None
    pending: bool = False  # its last round's packs are in a batch at the provider


@dataclass
class ReduceResult:
    """How the reduce step ended: its table, its totals, and its stop reason if a round stopped early."""

    output: Path
    groups: int
    ok: int
    failed: int
    rounds: int
    requests_sent: int  # by this run
    cost_usd: float
    stopped: Any = None
    requests: int = 0   # over the whole folds, whichever run sent them
    pending: int = 0    # Batch API mode without waiting: the packs of the last round still at the provider
    pending_round: int = 0


def run_reduce(job: Job, run_round: Callable[[Job, pl.DataFrame], Any], *, fresh: bool = False,
               spent: float = 0.0) -> ReduceResult:
    """Fold every group to one answer, round by round. ``run_round(round_job, packs)`` runs one round through the
    engine (``run.run`` with the frame of packs as its input), so each round has its own journal. ``fresh``
    (``--fresh``): the earlier rounds' folder is moved aside (kept, not deleted) and every pack sent again.
    ``spent``: what this run's map step spent, taken off ``[budget].max_cost_usd`` with each round's spending, so
    one budget bounds the run's whole chain."""
    from pipeline.sink import move_aside

    spec = job.reduce
    assert spec is not None
    packer = Packer(spec, ChatTokenCounter(spec.model), budget_of(job, reduce_price(job)), job.source)
    order, groups = items_of(job, map_items(job))
    folds = {k: GroupFold(groups[k][0], groups[k][1], len(groups[k][1])) for k in order}
    folder = Path(spec.output).with_suffix(".work")
    if fresh:
        move_aside(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pending = [k for k in order if folds[k].items]
    round_, sent, stopped, waiting = 1, 0, None, 0
    while pending:
        rows: list[dict[str, Any]] = []
        cuts: dict[str, list[str]] = {}
        for key in pending:
            fold = folds[key]
            names = []
            for n, (_start, _end, _tokens, text) in enumerate(packer.packs(fold.group, fold.items, round_)):
                name = f"{round_}:{len(rows)}:{n}"
                rows.append({"pack": name, PACK: text})
                names.append(name)
            cuts[key] = names
        cap = job.budget.max_cost_usd
        left = None if cap is None else cap - spent
        if left is not None and left <= 0:
            stopped = BudgetExceeded(f"stopped before reduce round {round_}: this run spent ${spent:,.4f} of "
                                     f"[budget].max_cost_usd = ${cap:g} on the steps before it")
            break
        try:
            result = run_round(reduce_job(job, round_, folder, left), pl.DataFrame(rows))
        except BudgetExceeded as e:  # a round of batches whose bound is above what is left: nothing submitted
            stopped = e
            break
        sent += result.stats.requests_sent
        spent += result.stats.cost_usd
        out = pl.read_parquet(result.output)
        answers = {r["pack"]: r for r in out.iter_rows(named=True)}
        nxt = []
        for key in pending:
            fold = folds[key]
            fold.rounds = round_
            got = [answers.get(name) for name in cuts[key]]
            for a in got:
                if a is None:
                    continue
                fold.requests += 1
                fold.prompt_tokens += a.get("prompt_tokens") or 0
                fold.completion_tokens += a.get("completion_tokens") or 0
                fold.cost_usd += a.get("cost_usd") or 0.0
            bad = [a for a in got if a is None or a["status"] != "ok"]
            if result.stats.pending and any(a is None for a in got):
                fold.pending = True  # its packs are in a batch at the provider: the run that collects goes on
            elif bad:
                first = bad[0]
                fold.error = (f"round {round_}: a pack was not answered: {result.stopped or 'the round stopped'}"
                              if first is None else f"round {round_}: {first['error']}")
                continue
            contents = [a["content"] for a in got if a is not None]
            if len(contents) == 1:
                fold.answer = contents[0]
            else:
                fold.items = [{"content": c} for c in contents]
                nxt.append(key)
        if result.stopped is not None:
            stopped = result.stopped
            break
        if result.stats.pending:  # submitted without waiting: a later run collects this round and goes on
            waiting = result.stats.pending
            break
        pending, round_ = nxt, round_ + 1
    if stopped is not None:
        for key in pending:
            fold = folds[key]
            if fold.answer is None and fold.error is None:
                fold.error = f"not reduced: {stopped}"
    table = _table(job, [folds[k] for k in order])
    Path(spec.output).parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(spec.output)
    total = sum(f.cost_usd for f in folds.values())
    ok = sum(f.answer is not None for f in folds.values())
    failed = sum(f.answer is None and not f.pending for f in folds.values())
    return ReduceResult(Path(spec.output), len(order), ok, failed, max((f.rounds for f in folds.values()),
                                                                             default=0),
                        sent, total, stopped, sum(f.requests for f in folds.values()), waiting,
                        round_ if waiting else 0)


def _table(job: Job, folds: Iterable[GroupFold]) -> pl.DataFrame:
    """One row per group: its columns, the answer (content, or the schema's typed fields), the fold's totals."""
    spec = job.reduce
    assert spec is not None
    rows = []
    for f in folds:
        rows.append({**f.group, "content": f.answer, "items": f.input_items, "rounds": f.rounds,
                     "requests": f.requests, "prompt_tokens": f.prompt_tokens,
                     "completion_tokens": f.completion_tokens, "cost_usd": round(f.cost_usd, 12),
                     "status": "ok" if f.answer is not None else "pending" if f.pending else "error",
                     "error": f.error})
    schema: dict[str, pl.DataType] = {"content": pl.String(), "items": pl.Int64(), "rounds": pl.Int32(),
                                      "requests": pl.Int64(), "prompt_tokens": pl.Int64(),
                                      "completion_tokens": pl.Int64(), "cost_usd": pl.Float64(),
                                      "status": pl.String(), "error": pl.String()}
    df = pl.DataFrame(rows, schema_overrides=schema, infer_schema_length=None) if rows else pl.DataFrame(
        schema=schema)
    if spec.response_schema is not None and df.height:
        from pipeline.structured import AnswerChecker, columns_of

        checker = AnswerChecker(spec.response_schema)
        columns = columns_of(spec.response_schema)
        values = [checker.values(c) for c in df.get_column("content").to_list()]
        typed = pl.DataFrame([dict(zip(columns, v, strict=True)) for v in values], schema=columns)
        df = pl.concat([df.select([*spec.group_by]), typed, df.drop(list(spec.group_by))], how="horizontal")
    return df


def chain_estimate(job: Job, limit: int | None = None, measured_tokens: float | None = None) -> Chain:
    """The reduce step's plan before the run: over the input's rows (exact round 1 for a job of [reduce] alone),
    or over the map's answers still to come (each at the map's ``max_tokens``). ``measured_tokens``: the mean
    answer length a ``--sample`` of the map measured, which plans the rounds a second time as expected figures."""
    spec = job.reduce
    assert spec is not None
    price, counter = reduce_price(job), ChatTokenCounter(spec.model)
    if job.maps:  # the map's answers are still to come: the input's columns the reduce reads, and an empty answer
        rows = input_rows(job, list(dict.fromkeys((*spec.group_by, *spec.order_by, *spec.items))), limit)
        rows = rows.with_columns(pl.lit("").alias("content"))
    else:
        rows = input_rows(job, limit=limit)
    chain = plan_chain(job, price, counter, map_rows=rows, map_max_tokens=job.request.max_tokens if job.maps else None)
    chain.map_batch = job.maps and job.request.mode == "batch"
    if job.maps and measured_tokens is not None:
        mean = max(1, round(measured_tokens))
        expected = plan_chain(job, price, counter, map_rows=rows, map_max_tokens=mean)
        chain.expected, chain.expected_cost_usd = expected.rounds, expected.cost_usd_max
        chain.expected_basis = (f"the map's answers at the sample's mean of {mean:,} tokens; partial answers at the "
                                "reduce's max_tokens")
    return chain

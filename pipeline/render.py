"""Rows -> messages, through sandboxed Jinja2 templates; the request builder (``bodies.py``) makes them bodies.

The sandbox keeps a template from reaching Python internals, StrictUndefined turns a typo into an error
instead of an empty prompt, and every column a template names is checked against the input schema before any
row is rendered. A null cell renders as an empty string, or skips its row when the job says ``skip_nulls``.
Plain substitutions of a column render in polars a chunk at a time, and then go into the builder's body frame.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import jinja2
import jinja2.meta
import jinja2.nodes
import polars as pl
from jinja2.runtime import new_context
from jinja2.sandbox import SandboxedEnvironment

from pipeline.bodies import BodyBuilder
from pipeline.endpoints import endpoint_of
from pipeline.endpoints.base import MediaProblem
from pipeline.errors import TemplateError
from pipeline.images import Image, ImageLoader, ImageProblem
from pipeline.job import Job
from pipeline.providers import DESCRIPTORS, Provider, provider_for
from pipeline.rendered import RenderedChunk, Request, Skipped
from pipeline.source import ROW, Source, check_columns

ROW_VARIABLE = "row"  # a mapping of the whole row, for column names that are not identifiers


# A rendered row on its way to a Request (its prompt tokens not counted yet): (row, id, kept values, the texts of
# the templated parts, body, key, image tokens), read through the names below. A plain tuple, not a NamedTuple:
# the garbage collector stops tracking plain tuples of plain values, not a tuple subclass's, and a million tracked
# rows made the 1M-row estimate about 9% slower (bench/estimate.py).
Pending = tuple[int, Any, tuple[Any, ...], tuple[str, ...], bytes, str, int]
P_ROW: Final = 0
P_TEXTS: Final = 3
P_KEY: Final = 5


@dataclass
class PreparedChunk:
    """A chunk rendered up to its token counting (``Renderer.prepare_chunk``)."""

    pending: list[Pending]  # in sending order
    repeat: list[bool]  # by pending position: not counted, as it will not be sent (answered, or a repeated key)
    prior: list[int] | None  # by pending position: the count of an earlier pass (0: none)
    texts: list[str]  # what must be counted, the templated parts of each row that needs counting in turn
    skipped: list[Skipped]
    known: Mapping[str, Any]  # key -> answer on record
    url_images: int
    per_row: int  # templated parts per row
    firsts: set[str]  # the keys this chunk counts (with ``counted_before``): a later chunk's repeats of them


IMAGE_CHUNK_ROWS = 128  # an image job's chunk: 128 inline images of a few hundred KB are tens of MB
KEEP_BYTES = 32 << 20  # what an estimate pass may keep of rendered requests for the run (~40k short rows)
# A Request's object, key, id and kept values beside its body (measured ~450; bench/throughput.py)
_REQUEST_OVERHEAD = 512


@dataclass
class KeptChunks:
    """The chunks an estimate pass rendered, kept for the run while they fit in ``budget_bytes``: a job that
    fits is rendered once, not once to estimate and again to send. Past the budget nothing is kept
    (``complete`` is False) and the run renders as it goes."""

    budget_bytes: int = field(default_factory=lambda: KEEP_BYTES)
    chunks: deque[RenderedChunk] = field(default_factory=deque)
    size: int = 0
    complete: bool = True

    def add(self, chunk: RenderedChunk) -> None:
        """Keep one more chunk, or give up keeping when the budget is spent."""
        if not self.complete:
            return
        self.size += sum(len(r.body) for r in chunk.requests) + _REQUEST_OVERHEAD * len(chunk.requests)
        if self.size > self.budget_bytes:
            self.chunks.clear()
            self.complete = False
            return
        self.chunks.append(chunk)

    def take(self) -> Iterator[RenderedChunk]:
        """The kept chunks in order, each let go once it is handed over."""
        while self.chunks:
            yield self.chunks.popleft()


@dataclass(frozen=True)
class _Part:
    role: str
    source: str
    template: jinja2.Template | None  # None: constant text, rendered once
    text: str
    pieces: tuple[tuple[bool, str], ...] | None = None  # (is_column, literal or column): a plain substitution
    variables: frozenset[str] = frozenset()  # the names the template reads
    row_keys: frozenset[str] | None = frozenset()  # the columns read as row["..."] (None: any column)


_PLAIN_DTYPES = (pl.String, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


def row_columns(ast: jinja2.nodes.Template) -> frozenset[str] | None:
    """The columns a template reads through ``row["..."]`` or ``row.name``; None when it uses ``row`` any other
    way (a computed key, a loop over it), so that any column may be read."""
    keys: set[str] = set()
    constant = 0
    for node in ast.find_all((jinja2.nodes.Getitem, jinja2.nodes.Getattr)):
        assert isinstance(node, jinja2.nodes.Getitem | jinja2.nodes.Getattr)
        target = node.node
        if isinstance(target, jinja2.nodes.Name) and target.name == ROW_VARIABLE:
            if isinstance(node, jinja2.nodes.Getattr):
                keys.add(node.attr)
            elif isinstance(node.arg, jinja2.nodes.Const) and isinstance(node.arg.value, str):
                keys.add(node.arg.value)
            else:
                return None
            constant += 1
    uses = sum(1 for n in ast.find_all(jinja2.nodes.Name) if n.name == ROW_VARIABLE and n.ctx == "load")
    return frozenset(keys) if uses == constant else None


def _plain_pieces(ast: jinja2.nodes.Template) -> tuple[tuple[bool, str], ...] | None:
    """The template as literal text and bare ``{{ column }}`` references, or None if it does anything more."""
    if len(ast.body) != 1 or not isinstance(ast.body[0], jinja2.nodes.Output):
        return None
    pieces: list[tuple[bool, str]] = []
    for node in ast.body[0].nodes:
        if isinstance(node, jinja2.nodes.TemplateData):
            pieces.append((False, node.data))
        elif isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name != ROW_VARIABLE:
            pieces.append((True, node.name))
        else:
            return None
    return tuple(pieces)


def _finalize(value: object) -> object:
    return "" if value is None else value


class Renderer:
    """Turns input chunks into requests for one job; built once, after the job and the input are checked."""

    def __init__(self, job: Job, source: Source, provider: Provider | None = None) -> None:
        self.job = job
        self.env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, finalize=_finalize,
                                        keep_trailing_newline=False, autoescape=False)
        self._globals = dict(self.env.globals)
        self._concat = self.env.concat
        self.parts: list[_Part] = []
        req = job.request
        self.endpoint = endpoint = endpoint_of(req.endpoint)
        if req.system:
            self.parts.append(self._compile("system", req.system, f"{job.source}: [request].system"))
        for i, m in enumerate(req.messages):
            self.parts.append(self._compile(m.role, m.content, f"{job.source}: [request].messages[{i}]"))
        self.parts.append(self._compile(endpoint.prompt_role, req.prompt, req.prompt_source))
        # Images: a template each, or a bare reference to a binary column (its bytes are the image).
        self.image_parts = [(self._compile("image", i.template, i.where), i.detail) for i in req.chat.images]
        self.template_columns = self._referenced_columns(source)
        self._binary = [p.pieces[0][1] if p.pieces is not None and len(p.pieces) == 1 and p.pieces[0][0]
                        and source.schema[p.pieces[0][1]] == pl.Binary else None for p, _ in self.image_parts]
        # A request carrying a file the endpoint reads (a transcription's audio): the last template names it, a
        # path or a bare reference to a binary column (its bytes are the file).
        self.media = endpoint.media(req, _input_folder(job.input.path))
        last = self.parts[-1]
        self._media_column = (last.pieces[0][1] if self.media is not None and last.pieces is not None
                              and len(last.pieces) == 1 and last.pieces[0][0]
                              and source.schema[last.pieces[0][1]] == pl.Binary else None)
        # Plain substitutions of string and integer columns render in polars, a chunk at a time: the same text
        # Jinja would produce (nulls as "", integers in decimal), without a Python call per row.
        self.parts = [p if p.pieces is None or all(not is_col or isinstance(source.schema[v], _PLAIN_DTYPES)
                                                  for is_col, v in p.pieces)
                      else replace(p, pieces=None) for p in self.parts]
        self.id_column = job.input.id
        if self.id_column:
            check_columns(source, [self.id_column], f"{job.source}: [input].id")
        check_columns(source, job.input.keep, f"{job.source}: [input].keep")
        provider = provider or provider_for(job)
        facts = DESCRIPTORS[provider.name]
        self.images = ImageLoader(_input_folder(job.input.path), facts.image_limits) if req.chat.images else None

        self.counter = provider.counter(req.model)
        self.codec = provider.codec(req, job.name)
        self.builder = BodyBuilder(endpoint, self.codec, facts.image_rule(req.model), self.media,
                                   plain_input=self.parts[-1].pieces is not None)
        c = self.counter
        if not endpoint.chat_messages:  # a plain-text input: no chat framing
            self.fixed_tokens = sum(c.fixed(p.text) for p in self.parts if p.template is None)
        else:  # the framing of each message, the constant texts, and what the provider adds (a schema)
            self.fixed_tokens = c.priming + self.codec.added_tokens(c) + sum(
                c.per_message + c.fixed(p.role) + (c.fixed(p.text) if p.template is None else 0)
                for p in self.parts)
        # Prompt caching: the leading constant messages (system, few-shot) and what the dialect adds are the
        # prefix every request shares; a provider that caches it bills the repeats at its cached rate.
        self.cache = provider.prompt_cache(req.model)
        leading = []
        for p in self.parts[:-1]:
            if p.template is not None:
                break
            leading.append(p)
        self.static_prefix_tokens = 0 if not endpoint.chat_messages or not leading else (
            c.priming + self.codec.added_tokens(c)
            + sum(c.per_message + c.fixed(p.role) + c.fixed(p.text) for p in leading))
        self.cached_prefix_tokens = self.cache.read_tokens(self.static_prefix_tokens)
        if self.cache.style == "breakpoint":
            system_static = all(p.template is None for p in self.parts if p.role in ("system", "developer"))
            if system_static and self.cached_prefix_tokens:
                self.codec.mark_cache()
            else:
                self.cached_prefix_tokens = 0
        # Rows whose leading messages are templated share a prefix only with rows rendering them alike: a chunk
        # is sent in the order of those texts, so such rows go out close together (the output keeps its order).
        self._sort_by_prefix = endpoint.chat_messages and any(p.template is not None for p in self.parts[:-1])
        # Every templated part a plain substitution: bodies from the builder's frame, no message list per row.
        variable_plain = all(p.pieces is not None for p in self.parts if p.template is not None)
        self._body_frame = None if self.image_parts or not variable_plain else self.builder.frame(
            [(p.role, None if p.template is not None else p.text) for p in self.parts])

    def chunk_rows(self, rows: int) -> int:
        """Rows per chunk: fewer for image jobs, whose bodies carry their images (a chunk's bodies live at once)."""
        return min(rows, IMAGE_CHUNK_ROWS) if self.image_parts else rows

    @property
    def columns(self) -> list[str]:
        """Input columns a chunk must carry: template columns, the id and the kept columns."""
        cols = [*self.template_columns, *self.job.input.keep]
        if self.id_column:
            cols.append(self.id_column)
        return list(dict.fromkeys(cols))

    def _compile(self, role: str, text: str, where: str) -> _Part:
        try:
            ast = self.env.parse(text)
            variables = frozenset(jinja2.meta.find_undeclared_variables(ast))
            template = self.env.from_string(ast)  # compiled from the parsed tree: the text is parsed once
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{where}: template syntax error on line {e.lineno}: {e.message}") from None
        if not variables:
            # A template without variables still goes through Jinja once, so `{{ "x" }}`-style constants work.
            try:
                text = template.render()
            except jinja2.exceptions.SecurityError as e:
                raise TemplateError(f"{where}: not allowed in a template: {e}") from None
            except Exception as e:  # a filter failing on constant arguments
                raise TemplateError(f"{where}: {type(e).__name__}: {e}") from None
            return _Part(role=role, source=where, template=None, text=text)
        return _Part(role=role, source=where, template=template, text=text, pieces=_plain_pieces(ast),
                     variables=variables, row_keys=row_columns(ast))

    def _referenced_columns(self, source: Source) -> list[str]:
        cols: list[str] = []
        for p in [*self.parts, *(part for part, _ in self.image_parts)]:
            if p.template is None:
                continue
            names = set(p.variables)
            if ROW_VARIABLE in names and ROW_VARIABLE not in source.schema:
                names.discard(ROW_VARIABLE)
                if p.row_keys is None:
                    cols.extend(source.columns)  # `row[some_expression]` can read any column
                else:
                    names |= p.row_keys  # `row["odd name"]`: exactly the columns named
            missing = sorted(n for n in names if n not in source.schema)
            if missing:
                raise TemplateError(f"{p.source}: template uses column(s) the input lacks: {', '.join(missing)} "
                                    f"(available: {', '.join(source.columns)})")
            cols.extend(sorted(names))
        return list(dict.fromkeys(cols))

    def render_messages(self, values: dict[str, Any], row_id: Any,
                        prerendered: dict[int, str] | None = None) -> list[dict[str, str]]:
        """The chat messages of one row (``prerendered``: parts already rendered for the whole chunk)."""
        messages = []
        for i, p in enumerate(self.parts):
            if p.template is None:
                content = p.text
            elif prerendered is not None and i in prerendered:
                content = prerendered[i]
            else:
                content = self._render(p, values, row_id)
            messages.append({"role": p.role, "content": content})
        return messages

    def _render(self, p: _Part, values: dict[str, Any], row_id: Any) -> str:
        """One templated part for one row."""
        if p.template is None:
            return p.text
        try:
            # Template.render copies the globals ChainMap into every context; a prebuilt plain dict of globals
            # shared across rows makes rendering ~3x cheaper, which a million rows feel.
            ctx = new_context(self.env, p.template.name, p.template.blocks,
                              {**self._globals, **values, ROW_VARIABLE: values}, shared=True)
            return str(self._concat(p.template.root_render_func(ctx)))
        except jinja2.UndefinedError as e:
            raise TemplateError(f"{p.source}: row {row_id}: {e.message}") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{p.source}: row {row_id}: not allowed in a template: {e}") from None
        except Exception as e:  # a filter failing on this row's data
            raise TemplateError(f"{p.source}: row {row_id}: {type(e).__name__}: {e}") from None

    def row_images(self, values: dict[str, Any], row_id: Any) -> list[Image]:
        """The row's images, read and checked; ImageProblem names the image and what is wrong with it."""
        assert self.images is not None
        images = []
        for n, ((part, detail), column) in enumerate(zip(self.image_parts, self._binary, strict=True)):
            source = values[column] if column is not None else self._render(part, values, row_id)
            try:
                images.append(self.images.load(source, detail))
            except ImageProblem as e:
                which = f"images[{n}]" if len(self.image_parts) > 1 else "image"
                raise ImageProblem(f"{which}: {e}") from None
        most = self.images.limits.request_bytes
        if most is not None and sum(len(i.data or b"") for i in images) > most:
            raise ImageProblem(f"the row's images are more than {most / 1e6:g} MB together, more than one request "
                               "takes")
        return images

    def check_images(self, chunk: pl.DataFrame) -> list[tuple[Any, str]]:
        """(row id, why) of each row of a chunk whose images cannot be sent (what ``validate`` lists); the images
        are read and let go, no body is built."""
        ids = chunk.get_column(self.id_column if self.id_column else ROW).to_list()
        bad = []
        for row_id, values in zip(ids, chunk.select(self.template_columns).iter_rows(named=True), strict=True):
            if self.job.input.skip_nulls and any(v is None for v in values.values()):
                continue
            try:
                self.row_images(values, row_id)
            except ImageProblem as e:
                bad.append((row_id, f"bad image: {e}"))
        return bad

    @staticmethod
    def _render_column(chunk: pl.DataFrame, part: _Part) -> list[str]:
        assert part.pieces is not None
        exprs = [pl.col(v).cast(pl.String).fill_null("") if is_col else pl.lit(v, dtype=pl.String)
                 for is_col, v in part.pieces]
        return chunk.select(pl.concat_str(exprs).alias("t")).get_column("t").to_list()

    def body(self, messages: list[dict[str, str]]) -> bytes:
        """The exact body of a row's messages (``BodyBuilder.body``)."""
        return self.builder.body(messages)

    def render_chunk(self, chunk: pl.DataFrame, settled: Callable[[list[str]], Mapping[str, Any]] | None = None,
                     counted: Sequence[int] | None = None,
                     counted_before: Callable[[str], bool] | None = None) -> RenderedChunk:
        """Render every row of a chunk, counting prompt tokens in one batch (``prepare_chunk`` says how)."""
        prepared = self.prepare_chunk(chunk, settled, counted, counted_before)
        return self.finish_chunk(prepared, self.counter.count_texts(prepared.texts))

    def prepare_chunk(self, chunk: pl.DataFrame, settled: Callable[[list[str]], Mapping[str, Any]] | None = None,
                      counted: Sequence[int] | None = None,
                      counted_before: Callable[[str], bool] | None = None, *, lean: bool = False) -> PreparedChunk:
        """Render every row of a chunk up to its token counting: ``texts`` are what ``finish_chunk`` needs
        counted, in one batch (``render_chunk`` does both; the estimate counts in another process meanwhile).

        ``settled`` (the journal's lookup) maps keys to answers already on record; those requests are not
        sent again, so their tokens are not counted (``prompt_tokens`` is 0) and their answers come back in
        ``RenderedChunk.settled``. Resuming a nearly finished job spends its time where the work is.
        ``counted`` holds prompt tokens by row position from an earlier pass (the estimate), so a run does
        not tokenize every row twice; rows it has no count for (0) are counted here. ``counted_before`` says
        which keys an earlier chunk counted already (the estimate's duplicates): those rows, and repeats of a key
        within the chunk, are not tokenized again and carry 0 prompt tokens, as they will not be sent.
        ``lean`` (an estimate, which sends nothing and keeps nothing): each request may carry its row number as
        its id, and no kept values.
        """
        fast = {i: self._render_column(chunk, p) for i, p in enumerate(self.parts) if p.pieces is not None}
        variable = [i for i, p in enumerate(self.parts) if p.template is not None]
        frame = self._body_frame
        framed = frame is not None and not self.job.input.skip_nulls and all(i in fast for i in variable)
        rows = chunk.get_column(ROW).to_list()
        if lean and framed:  # a third of an estimate's time went into these Python objects (bench/estimate.py)
            ids, keeps = rows, [()] * len(rows)
        else:
            ids = chunk.get_column(self.id_column).to_list() if self.id_column else rows
            keep_cols = [chunk.get_column(c).to_list() for c in self.job.input.keep]
            keeps = list(zip(*keep_cols, strict=True)) if keep_cols else [()] * len(rows)
        needs_values = self.job.input.skip_nulls or bool(self.image_parts) or self.media is not None or any(
            p.template is not None and p.pieces is None for p in self.parts)
        values_iter = chunk.select(self.template_columns).iter_rows(named=True) \
            if self.template_columns and needs_values else ({} for _ in rows)
        skip_nulls = self.job.input.skip_nulls
        builder = self.builder
        pending: list[Pending] = []
        url_images = 0
        skipped: list[Skipped] = []
        inputs = fast.get(len(self.parts) - 1)
        if framed:
            assert frame is not None
            columns = [fast[i] for i in variable]
            texts_of: list[tuple[str, ...]] = list(zip(*columns, strict=True)) if columns else [()] * len(rows)
            if texts_of:  # the frame must build what the builder builds
                builder.check_frame(frame, texts_of[0],
                                    self.render_messages({}, None, {i: col[0] for i, col in fast.items()}))
            bodies = builder.framed(frame, texts_of)
            keys = builder.keys(bodies)
            pending = [(row, row_id, keep, texts, body, key, 0) for row, row_id, keep, texts, body, key
                       in zip(rows, ids, keeps, texts_of, bodies, keys, strict=True)]
        elif (text_body := builder.text_body) is not None and inputs is not None and not skip_nulls:
            key_of = builder.key
            for row, row_id, keep, text in zip(rows, ids, keeps, inputs, strict=True):
                body = text_body(text)
                pending.append((row, row_id, keep, (text,), body, key_of(body), 0))
        else:
            for n, (row, row_id, keep, values) in enumerate(zip(rows, ids, keeps, values_iter, strict=True)):
                if skip_nulls:
                    nulls = [k for k, v in values.items() if v is None]
                    if nulls:
                        skipped.append(Skipped(row, row_id, f"skipped: null in column(s) {', '.join(nulls)}", keep))
                        continue
                prerendered = {i: col[n] for i, col in fast.items()} if fast else {}
                if self._media_column is not None:  # the file's bytes are the value, not a text to render
                    prerendered[len(self.parts) - 1] = ""
                msgs = self.render_messages(values, row_id, prerendered or None)
                image_tokens = 0
                if self.media is not None:
                    value = values[self._media_column] if self._media_column is not None else msgs[-1]["content"]
                    try:
                        body, key = builder.with_media(msgs, value)
                    except MediaProblem as e:
                        skipped.append(Skipped(row, row_id, str(e), keep, error_type=e.kind))
                        continue
                    # the file's name is no prompt text: counted as none
                    pending.append((row, row_id, keep, tuple("" if i == len(self.parts) - 1 else msgs[i]["content"]
                                                             for i in variable), body, key, 0))
                    continue
                if self.image_parts:
                    try:
                        images = self.row_images(values, row_id)
                    except ImageProblem as e:
                        skipped.append(Skipped(row, row_id, f"bad image: {e}", keep, error_type="bad_image"))
                        continue
                    body, image_tokens, urls = builder.with_images(msgs, images)
                    url_images += urls
                    del images  # the bytes live on in the body alone
                else:
                    body = builder.body(msgs)
                pending.append((row, row_id, keep, tuple(msgs[i]["content"] for i in variable), body,
                                builder.key(body), image_tokens))
        if self._sort_by_prefix:  # the texts of the templated leading messages come first in each row's texts
            leading = sum(1 for i in variable if i < len(self.parts) - 1)
            pending.sort(key=lambda p: p[P_TEXTS][:leading])
        known = dict(settled([p[P_KEY] for p in pending])) if settled is not None else {}
        have = counted if counted is not None else ()
        n_have = len(have)
        # each row's count from the earlier pass, 0 if none (None: there is no earlier pass)
        prior = [have[p[P_ROW]] if p[P_ROW] < n_have else 0 for p in pending] if n_have else None
        # which rows go out and need counting: not answered before, not counted before, not a repeat
        repeats = [False] * len(pending)
        firsts: set[str] = set()
        if counted_before is not None:
            for n, p in enumerate(pending):
                if p[P_KEY] in firsts or counted_before(p[P_KEY]):
                    repeats[n] = True
                else:
                    firsts.add(p[P_KEY])
        if known:
            repeats = [r or p[P_KEY] in known for r, p in zip(repeats, pending, strict=True)]
        # a row with a count from the earlier pass is not counted again either
        skip_count = repeats if prior is None else [r or c > 0 for r, c in zip(repeats, prior, strict=True)]
        texts = [t for p, skip in zip(pending, skip_count, strict=True) if not skip for t in p[P_TEXTS]]
        return PreparedChunk(pending, repeats, prior, texts, skipped, known, url_images, len(variable), firsts)

    def finish_chunk(self, prepared: PreparedChunk, counts: list[int]) -> RenderedChunk:
        """The chunk's requests, given the token counts of its ``texts``."""
        per_row = prepared.per_row
        if per_row != 1:  # one sum per row of its templated parts' counts
            it = iter(counts)
            counts = [sum(next(it) for _ in range(per_row)) for _ in range(len(counts) // per_row)] if per_row else []
        counts_it = iter(counts)
        max_out = self.job.request.max_tokens
        fixed = self.fixed_tokens
        repeat, prior = prepared.repeat, prepared.prior
        requests = []
        for n, (row, row_id, keep, _msgs, body, key, image_tokens) in enumerate(prepared.pending):
            if repeat[n]:
                tokens = image_tokens = 0
            elif prior and prior[n]:
                tokens = prior[n]
            else:
                tokens = fixed + next(counts_it) + image_tokens if per_row else fixed + image_tokens
            requests.append(Request(row, row_id, key, body, tokens, max_out, keep, image_tokens))
        return RenderedChunk(requests=requests, skipped=prepared.skipped, settled=prepared.known,
                             url_images=prepared.url_images)


def _input_folder(path: str) -> Path:
    """The folder image paths are relative to: the input file's, or for a glob the folder before its first
    wildcard."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return Path(*parts[:i]) if i else Path(".")
    return Path(path).parent

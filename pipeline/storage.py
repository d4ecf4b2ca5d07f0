"""Object storage (``s3://``, ``gs://``, ``az://``) for inputs and outputs, through pyarrow's own filesystems.

Why pyarrow.fs and not fsspec or obstore: pyarrow is already how Parquet is read and written here, its S3, GCS
and Azure filesystems ship in the PyPI wheel (no new dependency, no second HTTP stack), each follows its cloud's
standard credential chain (AWS_* variables, ~/.aws, instance roles; Google's application default credentials;
AZURE_STORAGE_* and Azure's default credential), and ``pq.ParquetFile`` over its files reads a footer with ranged
GETs, which is all the estimate and the Ray engine's planner need. A put on object storage is atomic (the
object appears whole or not at all), so a committed chunk is written straight to its final name.

The S3 endpoint comes from ``[storage].endpoint_url`` or ``AWS_ENDPOINT_URL`` (a MinIO, moto or other
S3-compatible server). Credentials are never read here, only handed to the SDK's chain, so they cannot reach a
log or an error message.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import InputError, OutputError

SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az"}


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for an object-storage address (a local path never has one of these schemes)."""
    return urlsplit(str(path)).scheme in SCHEMES


@functools.lru_cache(maxsize=16)
def _filesystem(kind: str, endpoint: str | None, region: str | None, account: str | None) -> Any:
    import pyarrow.fs as pafs

    if kind == "s3":
        options: dict[str, Any] = {}
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
            options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
        if region or endpoint:
            options["region"] = region or "us-east-1"
        return pafs.S3FileSystem(**options)
    if kind == "gs":
        return pafs.GcsFileSystem()
    if not account:
        raise InputError("az:// paths need the storage account: set AZURE_STORAGE_ACCOUNT_NAME")
    return pafs.AzureFileSystem(account_name=account)


def filesystem(url: str, endpoint_url: str | None = None) -> tuple[Any, str]:
    """The pyarrow filesystem of ``url`` and the path inside it (``bucket/key``). Built once per settings: the
    environment's endpoint, region and account are part of what it is cached by, so a process that changes them
    (a notebook, a test) gets a filesystem on the new ones."""
    parts = urlsplit(url)
    kind = SCHEMES[parts.scheme]
    env = os.environ.get
    endpoint = (endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")) if kind == "s3" else None
    region = (env("AWS_REGION") or env("AWS_DEFAULT_REGION")) if kind == "s3" else None
    account = (env("AZURE_STORAGE_ACCOUNT_NAME") or env("AZURE_STORAGE_ACCOUNT")) if kind == "az" else None
    return _filesystem(kind, endpoint, region, account), f"{parts.netloc}{parts.path}"


def _url(scheme: str, path: str) -> str:
    return f"{scheme}://{path}"


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def list_files(pattern: str, endpoint_url: str | None = None) -> list[str]:
    """The objects a pattern names, sorted: one object, or every object under the pattern's fixed prefix that
    matches its wildcards. Raises InputError naming the pattern when the store cannot be listed."""
    import pyarrow.fs as pafs

    scheme = urlsplit(pattern).scheme
    fs, path = filesystem(pattern, endpoint_url)
    try:
        if not glob.has_magic(path):
            info = fs.get_file_info(path)
            return [pattern] if info.type == pafs.FileType.File else []
        fixed = path[:min(path.find(c) for c in "*?[" if c in path)]
        base = fixed.rsplit("/", 1)[0]
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as e:
        raise InputError(f"{pattern}: cannot list the object store: {_reason(e)}") from None
    return sorted(_url(scheme, f.path) for f in found
                  if f.type == pafs.FileType.File and fnmatch.fnmatchcase(f.path, path))


def size_and_tag(url: str, endpoint_url: str | None = None) -> tuple[int, str]:
    """An object's size and modification time (what identifies a version of it for a partition id)."""
    fs, path = filesystem(url, endpoint_url)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise InputError(f"{url}: cannot read the object: {_reason(e)}") from None
    return int(info.size or 0), str(info.mtime_ns or "")


def open_input(url: str, endpoint_url: str | None = None) -> Any:
    """A random-access file on the object (what ``pq.ParquetFile`` reads footers and row groups from)."""
    fs, path = filesystem(url, endpoint_url)
    try:
        return fs.open_input_file(path)
    except OSError as e:
        raise InputError(f"{url}: cannot open the object: {_reason(e)}") from None


def local_copy(url: str, endpoint_url: str | None = None) -> str:
    """A CSV or JSONL object copied to the local cache once per version (their readers need a seekable local
    file to stream from and to find a ragged line), returned as its local path."""
    size, tag = size_and_tag(url, endpoint_url)
    digest = hashlib.sha256(f"{url}\0{size}\0{tag}".encode()).hexdigest()[:20]
    cache = Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "pipeline") / "inputs"
    dest = cache / f"{digest}{Path(urlsplit(url).path).suffix}"
    if dest.exists() and dest.stat().st_size == size:
        return str(dest)
    fs, path = filesystem(url, endpoint_url)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".tmp")
        with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        tmp.replace(dest)
    except OSError as e:
        raise InputError(f"{url}: cannot copy the object to {cache}: {_reason(e)}") from None
    return str(dest)


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url, endpoint_url)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except OSError as e:
        raise OutputError(f"{url}: cannot read: {_reason(e)}") from None


def upload(local: str | Path, url: str, endpoint_url: str | None = None) -> None:
    """Copy a local file to an object."""
    fs, path = filesystem(url, endpoint_url)
    try:
        with open(local, "rb") as src, fs.open_output_stream(path) as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
    except OSError as e:
        raise OutputError(f"{url}: cannot upload {local}: {_reason(e)}") from None


def list_names(url_dir: str, endpoint_url: str | None = None) -> list[str]:
    """The names of the objects directly under a prefix (an empty list when there are none)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url_dir, endpoint_url)
    try:
        found = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True))
    except OSError as e:
        raise OutputError(f"{url_dir}: cannot list: {_reason(e)}") from None
    return sorted(f.base_name for f in found if f.type == pafs.FileType.File)


def stage_path(url: str, base: Path) -> str:
    """Where a run keeps an object-storage output's journal and working files: on the driver's own disk, in
    ``.pipeline/`` beside the job file, mirroring the bucket and key."""
    parts = urlsplit(url)
    return str(base / ".pipeline" / parts.scheme / parts.netloc / parts.path.lstrip("/"))


def manifest_url(output_url: str) -> str:
    """The manifest's object beside an output object (as NAME.manifest.json is beside a local output)."""
    return output_url[: -len(".parquet")] + ".manifest.json" if output_url.endswith(".parquet") else \
        output_url + ".manifest.json"


def pull_manifest(job: Any) -> None:
    """Before a run to object storage: the output's manifest (if any) copied to the stage, so the output is
    claimed exactly as a local one is (a different job's output is never overwritten)."""
    stage = Path(job.output.local)
    data = read_bytes(manifest_url(job.output.path), job.storage.endpoint_url)
    stage.parent.mkdir(parents=True, exist_ok=True)
    local = stage.with_suffix(".manifest.json")
    if data is not None:
        local.write_bytes(data)


def push_files(folder: Path, url_dir: str, endpoint_url: str | None = None) -> int:
    """Upload the files of a local folder under a prefix, those the prefix does not hold yet (their names carry
    their hashes, so a name there is the same file); before the table that names them. Returns how many."""
    if not folder.is_dir():
        return 0
    there = set(list_names(url_dir, endpoint_url))
    sent = 0
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in there:
            upload(f, f"{url_dir.rstrip('/')}/{f.name}", endpoint_url)
            sent += 1
    return sent


def push_output(job: Any, output: Path, manifest: Path) -> None:
    """After a run to object storage: the table, then its manifest (a reader that finds the manifest finds
    the table it describes)."""
    upload(output, job.output.path, job.storage.endpoint_url)
    upload(manifest, manifest_url(job.output.path), job.storage.endpoint_url)


def fetch_output(url: str, endpoint_url: str | None = None) -> Path:
    """An output on object storage (a file, or a Ray engine's folder of chunks) and its manifest, copied to a
    temporary folder for ``pipeline report``."""
    import tempfile

    import pyarrow.fs as pafs

    fs, path = filesystem(url, endpoint_url)
    dest = Path(tempfile.mkdtemp(prefix="pipeline-report-")) / Path(urlsplit(url).path).name
    try:
        kind = fs.get_file_info(path.rstrip("/")).type
    except OSError as e:
        raise InputError(f"{url}: cannot read the output: {_reason(e)}") from None
    if kind == pafs.FileType.File:
        names = [""]
    elif kind == pafs.FileType.Directory:
        dest.mkdir()
        names = [n for n in list_names(url, endpoint_url) if n.endswith(".parquet")]
    else:
        raise InputError(f"{url}: output not found")
    for name in names:
        src = f"{path.rstrip('/')}/{name}" if name else path
        try:
            with fs.open_input_stream(src) as f, open(dest / name if name else dest, "wb") as out:
                while chunk := f.read(8 << 20):
                    out.write(chunk)
        except OSError as e:
            raise InputError(f"{url}: cannot copy the output: {_reason(e)}") from None
    manifest = read_bytes(manifest_url(url), endpoint_url)
    if manifest is not None:
        dest.with_suffix(".manifest.json").write_bytes(manifest)
    return dest

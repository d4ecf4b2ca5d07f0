"""Audio in requests (transcription jobs): where each file comes from, what it really is, whether the API takes it,
and how long it is.

A row's audio is a local file (relative to the input's folder, as images are), an ``https://`` URL (downloaded once
into this machine's temporary folder: the API takes uploads only), or the bytes of a binary column. It is
checked before anything is sent, so a bad file fails its row alone with the reason: its container and codec read
from its first bytes (never from its name), its size against the API's limit, and its duration read from its
headers by mutagen (a maintained, pure-Python reader of audio metadata: it reads headers only, decodes nothing,
and ships no native code). The duration prices the row (per minute of audio) and fills its ``duration_s`` column.

The file's SHA-256 is part of the request's identity (its key), so a file changed under the same path is a new
request, and the same audio under another name is the same one.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from pathlib import Path

# OpenAI: "File uploads are currently limited to 25 MB" (the API's own message: "Maximum content size limit
# (26214400) exceeded"); "flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, or webm" (the API reference of
# POST /audio/transcriptions, read 2026-12-06).
MAX_BYTES = 26_214_400
# WAV format tags a decoder takes as WAV: PCM, IEEE float, A-law, mu-law, and the extensible header.
_WAV_CODECS = {0x0001: "pcm", 0x0003: "float", 0x0006: "alaw", 0x0007: "mulaw", 0xFFFE: "extensible"}
_OGG_CODECS = ((b"OpusHead", "opus"), (b"\x01vorbis", "vorbis"), (b"\x7fFLAC", "flac"))
MIME = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "ogg": "audio/ogg", "webm": "audio/webm",
        "mp4": "audio/mp4"}


class AudioProblem(Exception):
    """Why a row's audio cannot be sent; the message is what its row's error column says."""


@dataclass(frozen=True, slots=True)
class Audio:
    """One checked audio file of a row: where its bytes are (a path, or the bytes themselves), what it is, and
    what it weighs and lasts."""

    container: str
    codec: str
    size: int
    sha256: str
    duration_s: float
    path: str | None = None
    data: bytes | None = None

    @property
    def filename(self) -> str:
        """The name the upload carries (the API identifies the format by its extension and content)."""
        ext = {"mp4": "m4a"}.get(self.container, self.container)
        return f"audio.{ext}"

    @property
    def mime(self) -> str:
        """The content type of the upload."""
        return MIME[self.container]


def sniff(head: bytes) -> tuple[str, str]:
    """The container and codec of an audio file from its first bytes (at least 64 of them, when it has them)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav", _wav_codec(head)
    if head[:4] == b"fLaC":
        return "flac", "flac"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3", "mp3"
    if head[:4] == b"OggS":
        for magic, codec in _OGG_CODECS:
            if magic in head[:64]:
                return "ogg", codec
        raise AudioProblem("an Ogg file of an unknown codec (the API takes Opus, Vorbis and FLAC in Ogg)")
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm", "webm"
    if head[4:8] == b"ftyp":
        return "mp4", "aac"
    raise AudioProblem("not an audio file the API takes (flac, mp3, mp4/m4a, mpeg, ogg, wav, webm), by its content")


def _wav_codec(head: bytes) -> str:
    at = 12
    while at + 8 <= len(head):
        kind, size = head[at:at + 4], struct.unpack("<I", head[at + 4:at + 8])[0]
        if kind == b"fmt ":
            if at + 10 > len(head):
                break
            tag = struct.unpack("<H", head[at + 8:at + 10])[0]
            codec = _WAV_CODECS.get(tag)
            if codec is None:
                raise AudioProblem(f"a WAV file of an unknown codec (format tag 0x{tag:04x})")
            return codec
        at += 8 + size + (size & 1)
    raise AudioProblem("a WAV file without a format chunk where it should be")


def _duration(source: str | io.BytesIO) -> float:
    import mutagen

    try:
        found = mutagen.File(source)
    except Exception as e:  # mutagen raises its own error classes per format, and struct errors on damage
        raise AudioProblem(f"its headers cannot be read ({type(e).__name__}: {e})") from None
    length = getattr(getattr(found, "info", None), "length", None)
    if not length or length <= 0:
        raise AudioProblem("its duration cannot be read from its headers")
    return float(length)


class AudioLoader:
    """Reads and checks rows' audio. Paths are relative to ``base_dir`` (the input's folder)."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir

    def load(self, value: str | bytes | None) -> Audio:
        """The row's audio, checked; AudioProblem says what is wrong with it."""
        if value is None or value == "":
            raise AudioProblem("no audio (the cell is empty)")
        if isinstance(value, bytes):
            return self._check(value, None)
        if len(value) > 1000:
            raise AudioProblem(f"not a file's path ({len(value):,} characters): a binary column is given as the bare "
                               "template {{ column }}")
        if value.startswith(("https://", "http://")):
            path = self._downloaded(value)
        else:
            path = Path(value) if Path(value).is_absolute() else self.base_dir / value
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise AudioProblem(f"{value}: not a file")
        except FileNotFoundError:
            raise AudioProblem(f"{value}: file not found") from None
        except OSError as e:
            raise AudioProblem(f"{value}: cannot be read: {e.strerror}") from None
        if size > MAX_BYTES:
            raise AudioProblem(f"{value}: {size / 1e6:.1f} MB, more than the API takes ({MAX_BYTES / 1e6:.1f} MB)")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise AudioProblem(f"{value}: cannot be read: {e.strerror}") from None
        try:
            return self._check(data, str(path))
        except AudioProblem as e:
            raise AudioProblem(f"{value}: {e}") from None

    @staticmethod
    def _downloaded(url: str) -> Path:
        """A URL's file, fetched once into this machine's temporary folder (named by the URL's hash, so a rerun
        finds it there): the API takes uploads only. What it holds is checked like any file (its hash is the
        request's identity, so a URL whose content changed is a new request)."""
        import os
        import tempfile

        import httpx

        folder = Path(tempfile.gettempdir()) / f"pipeline-audio-{os.getuid() if hasattr(os, 'getuid') else 0}"
        path = folder / hashlib.sha256(url.encode()).hexdigest()[:32]
        if path.is_file():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        last = "no attempt"
        for _attempt in range(3):
            try:
                with httpx.stream("GET", url, follow_redirects=True, timeout=60.0) as r:
                    if r.status_code != 200:
                        last = f"HTTP {r.status_code}"
                        if r.status_code < 500 and r.status_code != 429:
                            break
                        continue
                    size = 0
                    with open(tmp, "wb") as fh:
                        for chunk in r.iter_bytes(1 << 20):
                            size += len(chunk)
                            if size > MAX_BYTES:
                                raise AudioProblem(f"{url}: more than the API takes ({MAX_BYTES / 1e6:.1f} MB)")
                            fh.write(chunk)
                os.replace(tmp, path)
                return path
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            finally:
                tmp.unlink(missing_ok=True)
        raise AudioProblem(f"{url}: cannot be downloaded ({last})")

    @staticmethod
    def _check(data: bytes, path: str | None) -> Audio:
        if len(data) > MAX_BYTES:
            raise AudioProblem(f"{len(data) / 1e6:.1f} MB, more than the API takes ({MAX_BYTES / 1e6:.1f} MB)")
        container, codec = sniff(data[:4096])
        duration = _duration(path if path is not None else io.BytesIO(data))
        return Audio(container=container, codec=codec, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     duration_s=duration, path=path, data=None if path is not None else data)

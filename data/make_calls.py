"""Make data/calls/ and data/calls.csv: short synthetic "call recordings" for the transcription example job.

Run: python data/make_calls.py [OUT_DIR]. Each call is a WAV file (8 kHz, 16-bit mono PCM) of a few seconds of a
soft tone, with what the caller "said" in the file's ``LIST/INFO/ICMT`` comment: the bundled simulator reads it as
its transcript, so the demo's answers can be checked against this table. Reproducible (no randomness); the bundled
files were made by this script.
"""

from __future__ import annotations

import io
import math
import struct
import sys
import wave
from pathlib import Path

import polars as pl

CALLS = [  # (file, customer, seconds, what was said)
    ("call01.wav", "C-1001", 2.5, "Hello, my kettle arrived with a cracked lid and I would like a replacement."),
    ("call02.wav", "C-1002", 3.0, "Hi, I was charged twice for the same order last Tuesday."),
    ("call03.wav", "C-1003", 1.5, "Can you tell me when the tent will be back in stock?"),
    ("call04.wav", "C-1004", 2.0, "The desk lamp flickers when it is on the lowest setting."),
    ("call05.wav", "C-1005", 3.5, "I want to cancel my subscription and get a refund for this month."),
    ("call06.wav", "C-1006", 1.0, "Thank you, the new charger works perfectly."),
]
RATE = 8_000


def wav(seconds: float, said: str, *, hz: float = 220.0) -> bytes:
    """A mono 16-bit PCM WAV of ``seconds`` of a soft tone, with ``said`` as its INFO comment."""
    frames = b"".join(struct.pack("<h", int(2000 * math.sin(2 * math.pi * hz * i / RATE)))
                      for i in range(int(seconds * RATE)))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(frames)
    data = buf.getvalue()
    text = said.encode() + b"\x00"
    if len(text) % 2:
        text += b"\x00"
    info = b"INFO" + b"ICMT" + struct.pack("<I", len(text)) + text
    body = data[12:] + b"LIST" + struct.pack("<I", len(info)) + info
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def main(out: Path) -> None:
    folder = out / "calls"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, _customer, seconds, said) in enumerate(CALLS):
        (folder / name).write_bytes(wav(seconds, said, hz=180.0 + 40 * i))
    pl.DataFrame({"call_id": [c[0].removesuffix(".wav") for c in CALLS], "customer": [c[1] for c in CALLS],
                  "file": [f"calls/{c[0]}" for c in CALLS]}).write_csv(out / "calls.csv")
    print(f"wrote {len(CALLS)} calls to {folder} and {out / 'calls.csv'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)

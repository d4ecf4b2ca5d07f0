"""Make data/photos/ and data/photos.csv: small synthetic "product photos" for the vision example job.

Run: python data/make_photos.py [OUT_DIR]. Each image is a few KB: a coloured background with a simple
shape, in PNG, JPEG, WEBP and GIF, at sizes that cost different numbers of image tokens. Reproducible (no
randomness); the bundled files were made by this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw

PHOTOS = [  # (file, product, colour, shape, size)
    ("lamp.png", "LumaGlow desk lamp", (250, 220, 120), "triangle", (320, 480)),
    ("kettle.jpg", "SteamPot kettle", (180, 200, 220), "circle", (640, 480)),
    ("tent.webp", "TrailLite 2-person tent", (90, 150, 90), "triangle", (800, 600)),
    ("backpack.png", "Summit 40L backpack", (200, 90, 60), "rectangle", (400, 400)),
    ("charger.gif", "VoltCharge 65W charger", (240, 240, 240), "rectangle", (256, 256)),
    ("monitor.jpg", "PixelView 27-inch monitor", (40, 40, 60), "rectangle", (1024, 576)),
    ("keyboard.webp", "SwiftType mechanical keyboard", (120, 120, 140), "rectangle", (900, 300)),
    ("blanket.png", "CozyKnit throw blanket", (170, 120, 190), "circle", (512, 512)),
]


def draw(colour: tuple[int, int, int], shape: str, size: tuple[int, int]) -> Image.Image:
    """A flat background with one dark shape in the middle."""
    w, h = size
    img = Image.new("RGB", size, colour)
    d = ImageDraw.Draw(img)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    ink = tuple(max(0, c - 90) for c in colour)
    if shape == "circle":
        d.ellipse(box, fill=ink)
    elif shape == "triangle":
        d.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=ink)
    else:
        d.rectangle(box, fill=ink)
    return img


def main(out: Path) -> None:
    """Write the images and the table that lists them (paths relative to the table's folder)."""
    folder = out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for file, _product, colour, shape, size in PHOTOS:
        img = draw(colour, shape, size)
        kind = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}[file.rsplit(".", 1)[1]]
        img.save(folder / file, kind, **({"quality": 70} if kind in ("JPEG", "WEBP") else {}))
    pl.DataFrame({
        "photo_id": [f"p{i:02d}" for i in range(len(PHOTOS))],
        "product": [p[1] for p in PHOTOS],
        "file": [f"photos/{p[0]}" for p in PHOTOS],
    }).write_csv(out / "photos.csv")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)

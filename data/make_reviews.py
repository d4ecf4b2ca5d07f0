"""Make data/reviews.parquet: synthetic but realistic product reviews, reproducible from a fixed seed.

Run: python data/make_reviews.py [ROWS] [OUT]. The bundled file has 3,000 rows. The text is assembled from
phrase banks so that reviews vary in length, tone and product, which is what the example jobs need.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import polars as pl

PRODUCTS = {
    "headphones": ["AeroSound X2 headphones", "QuietPro ANC headphones", "BassLine mini earbuds"],
    "kitchen": ["BrewMaster 12-cup coffee maker", "ChefEdge knife set", "SteamPot pressure cooker"],
    "home": ["LumaGlow desk lamp", "PureAir HEPA purifier", "CozyKnit throw blanket"],
    "outdoor": ["TrailLite 2-person tent", "Summit 40L backpack", "HydroFlow water filter"],
    "electronics": ["VoltCharge 65W charger", "PixelView 27-inch monitor", "SwiftType mechanical keyboard"],
}
OPENERS = {
    5: ["Absolutely love the {p}.", "Best purchase I've made this year.", "Exceeded every expectation."],
    4: ["Really solid {p} overall.", "Very happy with this, a few small nitpicks.", "Good value for the money."],
    3: ["It's okay, nothing special.", "Mixed feelings about the {p}.", "Does the job, but barely."],
    2: ["Disappointed with the {p}.", "Not what I expected at all.", "Had high hopes, but no."],
    1: ["Terrible. Returned the {p} after a week.", "Do not buy.", "Broke within days of arriving."],
}
DETAILS = {
    "good": ["Setup took less than five minutes.", "The build quality feels premium.",
             "Battery life easily lasts a full day.", "It is quieter than my old one.",
             "Customer support answered within an hour.", "Looks great on my desk.",
             "My partner uses it every day now.", "Shipping was fast and the box was well padded."],
    "bad": ["The instructions were confusing and partly missing.", "It stopped working after two weeks.",
            "The plastic feels cheap and creaks.", "Support never replied to my emails.",
            "It arrived with a scratch on the side.", "Much smaller than the photos suggest.",
            "The app keeps disconnecting.", "It gets noticeably hot after an hour of use."],
}
CLOSERS = ["Would recommend.", "Would not buy again.", "Five stars from me!", "Maybe wait for a discount.",
           "Update: still going strong after three months.", "Returning it tomorrow.", ""]
EXTRAS = ["Prix correct, mais la livraison était lente.", "Sehr gut verarbeitet, klare Empfehlung.",
          "La calidad es buena pero el envío tardó mucho.", "品質は良いですが、説明書が分かりにくいです。",
          "Works great 👍🔥", "Solid product 😊, would buy again."]


def make(rows: int, seed: int = 7) -> pl.DataFrame:
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        category = rng.choice(sorted(PRODUCTS))
        product = rng.choice(PRODUCTS[category])
        rating = rng.choices([5, 4, 3, 2, 1], weights=[35, 25, 15, 12, 13])[0]
        tone = "good" if rating >= 4 else "bad" if rating <= 2 else rng.choice(["good", "bad"])
        parts = [rng.choice(OPENERS[rating]).format(p=product)]
        parts += rng.sample(DETAILS[tone], k=rng.randint(1, 4))
        if rating == 3:
            parts += rng.sample(DETAILS["good" if tone == "bad" else "bad"], k=1)
        if rng.random() < 0.08:
            parts.append(rng.choice(EXTRAS))
        parts.append(rng.choice(CLOSERS))
        out.append({"review_id": f"r{i:06d}", "product": product, "category": category, "rating": rating,
                    "text": " ".join(p for p in parts if p)})
    return pl.DataFrame(out)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    dest = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name("reviews.parquet")
    make(n).write_parquet(dest, row_group_size=500)  # row groups: what the Ray engine cuts partitions at
    print(f"wrote {n} reviews to {dest}")

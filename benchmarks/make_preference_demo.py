"""Build lorakit's shipped preference demo from the shared AG News data (derived data: a few hundred headlines).

Each row: prompt = the headline and "Topic:", chosen = its topic, rejected = one of the three wrong topics (seeded).
Writes lorakit/demo/news_preferences_train.jsonl (320 rows, from AG News train) and news_preferences_eval.jsonl
(80 rows, from AG News dev).

    python -m benchmarks.make_preference_demo
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data/ag_news")
OUT = Path(__file__).resolve().parents[1] / "lorakit" / "demo"
TOPICS = ["World", "Sports", "Business", "Science"]  # AG News labels 0-3 (Sci/Tech said plainly)


def pairs(table: pd.DataFrame, n: int, seed: int) -> list[dict]:
    """n rows, balanced over the four topics, each with a seeded wrong topic."""
    rng = random.Random(seed)
    per_topic = n // len(TOPICS)
    picked = pd.concat([table[table.label == k].sample(per_topic, random_state=seed) for k in range(len(TOPICS))])
    rows = []
    for title, label in zip(picked.title, picked.label):
        wrong = rng.choice([t for i, t in enumerate(TOPICS) if i != label])
        rows.append({"prompt": f"{title.strip()}\nTopic:", "chosen": f" {TOPICS[label]}", "rejected": f" {wrong}"})
    rng.shuffle(rows)
    return rows


def write(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


def main() -> None:
    write(pairs(pd.read_csv(SHARED / "train.csv"), 320, seed=0), OUT / "news_preferences_train.jsonl")
    write(pairs(pd.read_csv(SHARED / "dev.csv"), 80, seed=1), OUT / "news_preferences_eval.jsonl")


if __name__ == "__main__":
    main()

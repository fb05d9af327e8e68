"""Deterministic synthetic multimodal recommendation data.

Items carry a latent topic mixture; their text (title + description) is written from topic word
lists and their small image encodes the topic as colour and stripe pattern, so a text or image
encoder can recover what ids alone must learn from interactions. Labels depend on the match between
a user's topic taste and the item's topics, plus item quality: a foundation teacher that reads text
knows cold items that the id embeddings never saw.

Everything is vectorised numpy (10M interactions in well under a minute on 2 cores); images are
written only when asked for (``image_dir``) and only once per item.

Example:
    >>> tables = generate(n_users=100, n_items=50, n_interactions=2000, seed=0)
    >>> sorted(tables)
    ['interactions', 'items', 'users']
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from appdistill.data import SOURCES
from appdistill.errors import ConfigError
from appdistill.io import json_digest

TOPICS: dict[str, list[str]] = {
    "space": ["galaxy", "rocket", "astronaut", "planet", "orbit", "comet", "nebula", "starship"],
    "cooking": ["recipe", "kitchen", "chef", "spice", "bread", "soup", "oven", "pastry"],
    "sports": ["football", "stadium", "coach", "marathon", "goal", "tennis", "champion", "team"],
    "music": ["guitar", "melody", "concert", "piano", "song", "drummer", "orchestra", "jazz"],
    "war": ["battle", "soldier", "army", "tank", "general", "siege", "trench", "empire"],
    "romance": ["love", "wedding", "kiss", "heart", "romance", "date", "bride", "valentine"],
    "crime": ["detective", "murder", "heist", "police", "gangster", "thief", "prison", "clue"],
    "nature": ["forest", "river", "mountain", "wolf", "ocean", "jungle", "bird", "glacier"],
}
FILLER = ["the", "of", "a", "story", "night", "return", "last", "secret", "great", "little", "new"]
#: review words by quality bucket (worst first) for ``quality_words``: text that knows what ids of a
#: rarely seen item cannot have learnt
QUALITY_WORDS = [
    ["dreadful", "awful", "terrible", "unwatchable"],
    ["boring", "tedious", "forgettable", "clumsy"],
    ["decent", "watchable", "passable", "ordinary"],
    ["charming", "enjoyable", "gripping", "delightful"],
    ["brilliant", "masterful", "stunning", "unforgettable"],
]
COUNTRIES = ["us", "uk", "de", "fr", "br", "in", "jp", "ng"]


def _item_text(rng: np.random.Generator, primary: np.ndarray, secondary: np.ndarray,
               names: list[str]) -> tuple[list[str], list[str]]:
    words = np.array([w for t in names for w in TOPICS[t]])
    per = len(next(iter(TOPICS.values())))
    n = len(primary)
    w1 = primary * per + rng.integers(0, per, n)
    w2 = primary * per + rng.integers(0, per, n)
    w3 = secondary * per + rng.integers(0, per, n)
    f = np.array(FILLER)[rng.integers(0, len(FILLER), n)]
    titles = [f"{a.capitalize()} {b} {c}" for a, b, c in zip(f, words[w1], words[w2])]
    texts = [f"{t}. A tale of {words[x]} and {words[y]}." for t, x, y in zip(titles, w2, w3)]
    return titles, texts


def _quality_sentences(rng: np.random.Generator, texts: list[str], quality: np.ndarray) -> list[str]:
    """``texts`` with a review sentence whose words follow ``quality`` (quantile buckets)."""
    k = len(QUALITY_WORDS)
    bucket = np.searchsorted(np.quantile(quality, np.linspace(0, 1, k + 1)[1:-1]), quality)
    per = len(QUALITY_WORDS[0])
    words = np.array([w for b in QUALITY_WORDS for w in b])
    w1 = bucket * per + rng.integers(0, per, len(texts))
    w2 = bucket * per + rng.integers(0, per, len(texts))
    return [f"{t} Critics call it {words[a]} and {words[b]}." for t, a, b in zip(texts, w1, w2)]


def _write_images(image_dir: Path, primary: np.ndarray, quality: np.ndarray, n_topics: int,
                  size: int = 32) -> None:
    """One small PNG per item: hue = primary topic, stripe frequency = quality bucket."""
    from PIL import Image

    image_dir.mkdir(parents=True, exist_ok=True)
    hue = (primary / n_topics)[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(len(primary)):
        p = image_dir / f"{i}.png"
        if p.exists():
            continue
        freq = 2 + int((quality[i] + 2) * 2)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx + yy))
        rgb = np.stack([
            np.clip(np.abs(hue[i] * 6 - 3) - 1, 0, 1) * stripes,
            np.clip(2 - np.abs(hue[i] * 6 - 2), 0, 1) * stripes,
            np.clip(2 - np.abs(hue[i] * 6 - 4), 0, 1) * (1 - 0.5 * stripes),
        ], axis=-1)
        tmp = p.with_suffix(".tmp.png")
        Image.fromarray((rgb * 255).astype(np.uint8)).save(tmp)
        os.replace(tmp, p)


def _choice(rng: np.random.Generator, n: int, size: int, p: np.ndarray) -> np.ndarray:
    """``rng.choice(n, size, p=p)``, the same draws from the same stream, with fewer cache misses.

    numpy draws ``size`` uniforms and binary-searches each in the cumulative weights; once those
    outgrow the CPU caches (4 MB for 500k users) every search pays ~7 misses, and the draws grew 15x
    for 10x rows. A guide table (for each of ``K`` equal slices of [0, 1), a power of two so that
    ``u * K`` and ``j / K`` are exact, the first index whose cumulative weight exceeds the slice's
    start) brackets each draw; a search finishes only the draws whose slice holds several indices.
    The result is ``searchsorted(cdf, u, side="right")`` exactly (``tests/test_data.py``).

    Args:
        rng: the generator; consumes ``rng.random(size)``, as ``choice`` does.
        n: number of categories (``len(p)``).
        size: number of draws.
        p: category probabilities ``[n]`` (non-negative, summing to 1).

    Returns:
        ``[size]`` int64 category indices.
    """
    cdf = np.asarray(p, np.float64).cumsum()
    cdf /= cdf[-1]
    u = rng.random(size)
    k_slices = 1 << max(10, int(np.ceil(np.log2(n))))
    guide = np.searchsorted(cdf, np.arange(k_slices + 1) / k_slices, side="right").astype(
        np.int32 if n < 2**31 else np.int64)  # half the bytes of the table every draw reads
    out = np.empty(size, np.int64)
    for a in range(0, size, 1 << 16):  # chunks keep the temporaries in cache
        x = u[a:a + (1 << 16)]
        k = (x * k_slices).astype(np.int64)
        lo, hi = guide[k], guide[k + 1]  # count(cdf <= x) lies in [lo, hi]
        todo = np.flatnonzero(lo < hi)
        if todo.size:
            lo_t, hi_t, x_t = lo[todo], hi[todo], x[todo]
            while True:
                open_ = lo_t < hi_t
                if not open_.any():
                    break
                mid = (lo_t + hi_t) >> 1
                right = open_ & (cdf[np.minimum(mid, n - 1)] <= x_t)
                lo_t = np.where(right, mid + 1, lo_t)
                hi_t = np.where(open_ & ~right, mid, hi_t)
            lo[todo] = lo_t
        out[a:a + (1 << 16)] = lo
    return out


def _affinity(taste: np.ndarray, primary: np.ndarray, secondary: np.ndarray, mix: np.ndarray,
              u: np.ndarray, i: np.ndarray) -> np.ndarray:
    """``(taste[u] * mix[i]).sum(1)`` as float64 ``[N]``, reading two of a user's topic weights.

    An item's mixture has two non-zero topics (one when primary == secondary), so the float32 sum
    of the eight products is the sum of those two whatever the order: the same bits, without
    gathering eight-wide rows of both tables per interaction.
    """
    n_topics = taste.shape[1]
    rows = np.arange(len(primary))
    w_primary = mix[rows, primary]
    w_secondary = np.where(primary != secondary, mix[rows, secondary], np.float32(0))
    flat = taste.reshape(-1)
    out = np.empty(len(u))
    for a in range(0, len(u), 1 << 16):
        uu, ii = u[a:a + (1 << 16)] * n_topics, i[a:a + (1 << 16)]
        out[a:a + (1 << 16)] = (flat[uu + primary[ii]] * w_primary[ii]
                                + flat[uu + secondary[ii]] * w_secondary[ii])
    return out


def generate(n_users: int = 2000, n_items: int = 1000, n_interactions: int = 100_000,
             n_topics: int = 8, seed: int = 0, zipf: float = 1.1, cold_fraction: float = 0.1,
             image_dir: str | None = None, quality_words: bool = False, cold_window: float = 0.1,
             quality_scale: float = 1.0, part: int = 0) -> dict[str, pd.DataFrame]:
    """Generate ``interactions``, ``items`` and ``users`` tables.

    Args:
        n_users, n_items, n_interactions: table sizes.
        n_topics: latent topics (at most ``len(TOPICS)``).
        seed: the only source of randomness; equal arguments give equal tables.
        zipf: exponent of the item-popularity long tail.
        cold_fraction: items that only appear in the last 10% of time (new releases).
        image_dir: if given, write one PNG per item there (column ``image`` holds ``<id>.png``).
        quality_words: end each item's text with a review sentence whose words follow the item's
            quality (five buckets of :data:`QUALITY_WORDS`), so the text carries the per-item
            effect that the ids of rarely seen and cold items cannot learn. Off by default: the
            text then names the topics only (which the genres also carry).
        cold_window: the late fraction of time in which the cold items appear (``0.1``: the last
            10%; ``0.2`` puts them in both the validation and the test part of a time split
            ``valid: 0.1, test: 0.1``).
        quality_scale: weight of the item quality in the label logit.
        part: ``k > 0`` draws another ``n_interactions`` interactions (their own random stream, their own
            time range) of the same users and items: a data set bigger than memory is written one part
            file at a time (``benchmarks/bench_stream.py``).

    The defaults reproduce the tables of earlier versions exactly (the new options draw from their
    own random stream).
    """
    if not 1 <= n_topics <= len(TOPICS):
        raise ConfigError(f"source synthetic: n_topics must be in [1, {len(TOPICS)}]")
    if not 0 < cold_window < 1:
        raise ConfigError("source synthetic: cold_window must be in (0, 1)")
    rng = np.random.default_rng(seed)
    names = list(TOPICS)[:n_topics]

    # items: primary + secondary topic, a topic mixture, quality, long-tail popularity
    primary = rng.integers(0, n_topics, n_items)
    secondary = rng.integers(0, n_topics, n_items)
    mix = np.zeros((n_items, n_topics), np.float32)
    mix[np.arange(n_items), primary] += 0.75
    mix[np.arange(n_items), secondary] += 0.25
    quality = rng.normal(0, 0.6, n_items).astype(np.float32)
    pop = 1.0 / np.arange(1, n_items + 1) ** zipf
    pop = pop[rng.permutation(n_items)]
    cold = rng.random(n_items) < cold_fraction
    titles, texts = _item_text(rng, primary, secondary, names)
    if quality_words:
        texts = _quality_sentences(np.random.default_rng([seed, 1]), texts, quality)
    genres = np.where(primary == secondary, np.array(names)[primary],
                      np.char.add(np.char.add(np.array(names)[primary], "|"), np.array(names)[secondary]))
    items = pd.DataFrame({
        "item_id": np.arange(n_items, dtype=np.int64),
        "title": titles,
        "text": texts,
        "genres": genres,
        "year": (1980 + rng.integers(0, 45, n_items)).astype(np.float32),
        "image": [f"{i}.png" for i in range(n_items)],
    })

    # users: taste over topics (Dirichlet), demographics weakly tied to taste
    taste = rng.dirichlet(np.full(n_topics, 0.5), n_users).astype(np.float32)
    users = pd.DataFrame({
        "user_id": np.arange(n_users, dtype=np.int64),
        "age": np.clip(rng.normal(35, 12, n_users) + 8 * (taste.argmax(1) % 3), 14, 90).astype(np.float32),
        "country": np.array(COUNTRIES)[rng.integers(0, len(COUNTRIES), n_users)],
    })

    # interactions: active users and popular items more often; cold items only at the end
    activity = rng.lognormal(0, 1, n_users)
    if part:
        rng = np.random.default_rng([seed, 2, part])
    u = _choice(rng, n_users, n_interactions, activity / activity.sum())
    ts = np.sort(rng.integers(1_600_000_000, 1_700_000_000, n_interactions))
    late = ts >= np.quantile(ts, 1.0 - cold_window)
    p_warm = np.where(cold, 0, pop)
    p_cold = np.where(cold, pop, 0)
    i = _choice(rng, n_items, n_interactions, p_warm / p_warm.sum())
    if cold.any():
        late_idx = np.flatnonzero(late & (rng.random(n_interactions) < 0.3))
        i[late_idx] = _choice(rng, n_items, len(late_idx), p_cold / p_cold.sum())
    affinity = _affinity(taste, primary, secondary, mix, u, i)
    affinity *= n_topics  # ~1 on average, >1 when tastes match
    logit = 2.5 * (affinity - 1.0) + quality_scale * quality[i] + rng.normal(0, 0.5, n_interactions)
    label = (rng.random(n_interactions) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    # copy=False: the arrays are this function's own, and consolidating them into one block copied
    # every column (0.5 s at 10M rows)
    inter = pd.DataFrame({"user_id": u.astype(np.int64, copy=False), "item_id": i.astype(np.int64, copy=False),
                          "click": label, "timestamp": ts.astype(np.int64, copy=False)}, copy=False)
    if image_dir is not None:
        _write_images(Path(image_dir), primary, quality, n_topics)
    return {"interactions": inter, "items": items, "users": users}


def default_image_dir(**kwargs: object) -> Path:
    """A per-arguments cache directory for synthetic images (``~/.cache/appdistill/...``)."""
    key = json_digest(kwargs, 12)
    root = Path(os.environ.get("APPDISTILL_CACHE", Path.home() / ".cache" / "appdistill"))
    return root / "synthetic" / key / "images"


@SOURCES.register("synthetic")
def load_synthetic(images: bool = False, **kwargs: object) -> dict[str, pd.DataFrame]:
    """Source ``synthetic``: :func:`generate` with ``kwargs``; ``images: true`` also writes PNGs."""
    image_dir = str(default_image_dir(**kwargs)) if images else None
    tables = generate(image_dir=image_dir, **kwargs)  # type: ignore[arg-type]
    if image_dir is not None:
        tables["items"]["image"] = image_dir + "/" + tables["items"]["image"]
    return tables

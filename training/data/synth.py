"""`synth`: a small, realistic dataset in the Amazon 2018 file format, deterministic per seed.

What it plants, and why:
- A catalog of video games and accessories: category paths such as
  "Video Games > PC > Accessories > Gaming Mice", brands, descriptions, Amazon-like titles.
- Series: the items of a sub-category come in chains (a game and its sequels, a product line
  and its upgrades). A user who took item j of a chain takes item j+1 next with high
  probability: a sequential pattern that transition-aware models (SASRec, ours) must learn and
  that popularity cannot.
- Users with coherent tastes (1-2 favourite sub-categories) and a persona (plays themselves,
  buys for a child, buys gifts) whose review texts and summaries carry preference and
  intention cues ("Bought this for my son who loves racing games").
- Every field and cleaning rule the loaders handle: HTML entities and tags in titles and
  descriptions, feature sentences appended to `category`, unicode, items without a title, an
  item without meta, meta of unreviewed items, duplicate (user, item) reviews, missing optional
  fields, `reviewTime` without `unixReviewTime`; malformed lines only when asked.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
import string
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REVIEWS_FILE = "Synth_Video_Games_5.json.gz"
META_FILE = "meta_Synth_Video_Games.json.gz"

PLATFORMS = ("PC", "PlayStation 4", "Xbox One", "Nintendo Switch")


@dataclass(frozen=True)
class Genre:
    name: str  # the category leaf
    likes: str  # "racing games": what a fan of it says they love
    first: tuple[str, ...]  # franchise name parts
    second: tuple[str, ...]
    subtitles: tuple[str, ...]
    features: tuple[str, ...]  # what a description or a review praises


GENRES = (
    Genre("Racing", "racing games", ("Turbo", "Nitro", "Apex", "Asphalt", "Neon", "Café"),
          ("Drift", "Circuit", "Rally", "Rush", "Kart"),
          ("Midnight Run", "World Tour", "Desert Storm", "Neon Nights", "Grand Prix"),
          ("24 tracks across six continents", "split-screen races for four players",
           "a career mode with car tuning", "a photo mode for your best drifts")),
    Genre("Role-Playing", "open-world RPGs", ("Shadow", "Ember", "Crystal", "Ōkami", "Iron"),
          ("Chronicles", "Legacy", "Saga", "Realms", "Oath"),
          ("The Lost Crown", "Heart of the Forge", "Ashes of Valor", "The Frozen Throne"),
          ("a 60-hour story with branching quests", "a deep crafting system",
           "companions with their own stories", "a huge map to explore")),
    Genre("Strategy", "strategy games", ("Empire", "Frontier", "Dominion", "Harbor"),
          ("Tactics", "Command", "Conquest", "Builders"),
          ("Age of Steam", "Rise of Nations", "Total Siege", "New Horizons"),
          ("turn-based battles on huge maps", "a city builder with real economics",
           "online matches against friends", "a campaign of 30 missions")),
    Genre("Sports", "sports games", ("Pro", "Ultimate", "All-Star", "Street"),
          ("Soccer", "Hoops", "Tennis", "Skate"),
          ("Season Edition", "World Cup", "Legends", "Champions"),
          ("licensed teams and stadiums", "a career mode", "online leagues",
           "realistic ball physics")),
    Genre("Shooter", "shooters", ("Black", "Steel", "Orbital", "Über"),
          ("Strike", "Vanguard", "Protocol", "Siege"),
          ("Zero Hour", "Cold Front", "Final Dawn", "Red Horizon"),
          ("fast 6v6 multiplayer", "a co-op campaign", "a battle royale mode",
           "tight gunplay at 60 fps")),
    Genre("Puzzle", "puzzle games", ("Pixel", "Tiny", "Clever", "Zen"),
          ("Blocks", "Garden", "Logic", "Tiles"),
          ("Deluxe", "Double Trouble", "Brain Teasers", "Around the World"),
          ("over 300 hand-made puzzles", "a relaxing soundtrack", "a daily challenge",
           "hints when you get stuck")),
    Genre("Kids & Family", "family games", ("Happy", "Bubble", "Sunny", "Niño"),
          ("Farm", "Pets", "Party", "Park"),
          ("Adventure Island", "Best Friends", "Summer Camp", "Big Day Out"),
          ("easy controls for young kids", "co-op for the whole family",
           "no reading needed", "cute animals to collect")),
    Genre("Fighting", "fighting games", ("Tekken-style", "Iron", "Dragon", "Thunder"),
          ("Fist", "Brawl", "Fury", "Clash"),
          ("Ultimate Edition", "Tournament", "Rising", "Champions Cup"),
          ("40 fighters with unique combos", "a training mode for beginners",
           "rollback netcode online", "an arcade mode")),
)


@dataclass(frozen=True)
class Accessory:
    name: str  # the category leaf
    platforms: tuple[str, ...]
    product: str  # singular noun for titles and reviews
    brands: tuple[str, ...]
    upgrades: tuple[str, ...]  # a product line in order: the chain
    features: tuple[str, ...]


ACCESSORIES = (
    Accessory("Gaming Mice", ("PC",), "Gaming Mouse", ("Vortexa", "Hexline", "Corvid Gear"),
              ("Wired", "Wireless", "Pro Wireless", "Ultralight Pro Wireless"),
              ("16,000 DPI sensor", "programmable side buttons", "70-hour battery",
               "a grip that fits big hands")),
    Accessory("Gaming Keyboards", ("PC",), "Mechanical Gaming Keyboard",
              ("Vortexa", "Keyforge", "Lumen Labs"),
              ("TKL", "Full-Size RGB", "Low-Profile Wireless", "Hall-Effect Pro"),
              ("hot-swappable switches", "per-key RGB lighting", "a detachable USB-C cable",
               "a wrist rest")),
    Accessory("Headsets", PLATFORMS, "Gaming Headset", ("Hexline", "Sonora", "Corvid Gear"),
              ("Stereo", "Surround 7.1", "Wireless Surround", "Wireless Pro ANC"),
              ("50 mm drivers", "a flip-to-mute microphone", "memory-foam ear cushions",
               "a 30-hour battery")),
    Accessory("Controllers", ("PlayStation 4", "Xbox One", "Nintendo Switch"), "Controller",
              ("Hexline", "Padworks", "Lumen Labs"),
              ("Wired", "Wireless", "Wireless Elite", "Elite Series 2"),
              ("remappable back paddles", "trigger stops", "a 40-hour battery",
               "textured grips")),
    Accessory("Racing Wheels", ("PC", "PlayStation 4", "Xbox One"), "Racing Wheel",
              ("Apex Motion", "Padworks"),
              ("Starter", "Force Feedback", "Direct Drive", "Direct Drive Pro"),
              ("force feedback that feels like the road", "a three-pedal set",
               "a metal gear shifter", "a 270° to 900° rotation")),
    Accessory("Cases & Storage", ("Nintendo Switch",), "Carrying Case",
              ("Padworks", "Nomad Cases"),
              ("Slim", "Deluxe", "Travel Pro", "Dock Travel Pro"),
              ("room for 24 game cards", "a hard shell", "a stand built in",
               "a pocket for cables")),
    Accessory("Batteries & Chargers", ("PlayStation 4", "Xbox One", "Nintendo Switch"),
              "Charging Station", ("Lumen Labs", "Voltcraft Gaming"),
              ("Single", "Dual", "Dual Fast", "Quad Fast"),
              ("charges two controllers in 2 hours", "LED charge indicators",
               "a weighted base", "a USB-C port")),
)

PUBLISHERS = ("Northwind Interactive", "Bluefern Games", "Kestrel Studios",
              "Ironvale Entertainment", "Studio Mistral", "Pinecone Play", "Árbol Digital")

# Appended to some 2018 `category` lists, as the real metadata does; the feature-sentence rule
# of the loader removes each of these shapes.
CATEGORY_FEATURES = (
    "For 1-4 players",
    "ESRB Rating: Teen",
    "Officially licensed by the manufacturer",
    "Includes a digital artbook and three bonus tracks.",
    "Experience the most ambitious entry in the series with a brand new story, all-new "
    "characters and a world twice the size of the original game",
    "Compatible with all controller models",
)

CHILDREN = ("son", "daughter", "nephew", "niece", "grandson", "granddaughter")
GIFT_FOR = ("husband", "wife", "best friend", "brother", "sister", "boyfriend", "girlfriend")
OCCASIONS = ("birthday", "Christmas", "anniversary", "graduation")
FIRST_NAMES = ("José", "Zoë", "Mia", "Liam", "Noah", "Amélie", "Sven", "Priya", "Kenji",
               "Olu", "Chloé", "Mateo", "Ana", "Björn", "Fatima", "Lucas")

START_DAY = datetime(2012, 1, 1, tzinfo=timezone.utc)
DAY = 86_400


@dataclass
class _Item:
    asin: str
    title: str  # raw, as written to meta (may carry HTML, may be empty)
    plain: str  # clean title, for review texts
    leaf: tuple[str, ...]  # category path
    kind: str  # "game" | "accessory"
    genre: Genre | None
    accessory: Accessory | None
    chain: int
    step: int  # position in its chain
    features: tuple[str, ...]
    brand: str | None
    meta: bool = True


@dataclass
class _User:
    reviewer_id: str
    name: str
    persona: str  # "self" | "parent" | "gift"
    relation: str  # child or gift recipient
    favourites: list[tuple[str, ...]]
    history: list[int] = field(default_factory=list)


def _asin(rng: random.Random, used: set[str]) -> str:
    while True:
        value = "B0" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=8))
        if value not in used:
            used.add(value)
            return value


def _reviewer_id(rng: random.Random, used: set[str]) -> str:
    while True:
        value = "A" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=13))
        if value not in used:
            used.add(value)
            return value


def _html_title(rng: random.Random, title: str) -> str:
    """The raw-title forms that the real metadata has (entities, double escaping, tags); the
    loader's cleaning turns each back into `title`."""
    form = rng.randrange(4)
    if form == 0 and "&" in title:
        return title.replace("&", "&amp;amp;" if rng.random() < 0.3 else "&amp;")
    if form == 1 and "'" in title:
        return title.replace("'", "&#39;")
    if form == 2:
        return title.replace(" - ", " <b>-</b> ", 1) if " - " in title else f"<i>{title}</i>"
    if any(ord(ch) > 127 for ch in title):
        return "".join(f"&#{ord(ch)};" if ord(ch) > 127 else ch for ch in title)
    return f'<span class="a-size-large">{title}</span>'


class _Catalog:
    def __init__(self, rng: random.Random, n_items: int):
        self.rng = rng
        self.items: list[_Item] = []
        self.chains: list[list[int]] = []
        self.leaves: dict[tuple[str, ...], list[int]] = {}  # leaf -> chain ids
        used: set[str] = set()
        leaves = [("game", p, g) for p in PLATFORMS for g in GENRES]
        leaves += [("accessory", p, a) for a in ACCESSORIES for p in a.platforms]
        rng.shuffle(leaves)
        # ~8 items a leaf: enough for 2-3 chains, few enough that tastes stay narrow.
        leaves = leaves[:max(3, min(len(leaves), n_items // 8))]
        # ~3% title-less standalone items (dropped by the loader), never inside a chain.
        n_titleless = max(1, n_items // 35)
        budget = n_items - n_titleless
        for index, (kind, platform, what) in enumerate(leaves):
            share = budget // len(leaves) + (1 if index < budget % len(leaves) else 0)
            self._fill_leaf(kind, platform, what, share, used)
        for k in range(n_titleless):
            kind, platform, what = rng.choice(leaves)
            leaf = self._leaf_path(kind, platform, what)
            # Empty after cleaning (missing), or without a letter or digit (unusable).
            title = "* * *" if k == 0 else rng.choice(["", "   ", "<br>"])
            self.items.append(_Item(
                asin=_asin(rng, used), title=title, plain="", leaf=leaf,
                kind=kind, genre=what if kind == "game" else None,
                accessory=what if kind == "accessory" else None, chain=-1, step=0,
                features=what.features, brand=None))
        # One reviewed item has no meta line at all (its reviews are dropped, counted).
        candidates = [i for i, item in enumerate(self.items) if item.chain >= 0
                      and len(self.chains[item.chain]) == 1]
        if candidates:
            self.items[rng.choice(candidates)].meta = False

    @staticmethod
    def _leaf_path(kind: str, platform: str, what) -> tuple[str, ...]:
        return ("Video Games", platform, "Games" if kind == "game" else "Accessories", what.name)

    def _fill_leaf(self, kind: str, platform: str, what, share: int, used: set[str]) -> None:
        rng = self.rng
        leaf = self._leaf_path(kind, platform, what)
        names_used: set[str] = set()
        while share > 0:
            length = min(share, rng.choice((1, 2, 3, 3, 4, 4, 5)))
            share -= length
            chain_id = len(self.chains)
            self.leaves.setdefault(leaf, []).append(chain_id)
            titles = (self._game_titles(what, platform, length, names_used) if kind == "game"
                      else self._accessory_titles(what, platform, length, names_used))
            brand = rng.choice(PUBLISHERS if kind == "game" else what.brands)
            chain = []
            for step, (plain, features) in enumerate(titles):
                raw = _html_title(rng, plain) if rng.random() < 0.12 else plain
                chain.append(len(self.items))
                self.items.append(_Item(
                    asin=_asin(rng, used), title=raw, plain=plain, leaf=leaf, kind=kind,
                    genre=what if kind == "game" else None,
                    accessory=what if kind == "accessory" else None, chain=chain_id, step=step,
                    features=features, brand=brand if rng.random() > 0.08 else None))
            self.chains.append(chain)

    def _game_titles(self, genre: Genre, platform: str, length: int, names_used: set[str]):
        rng = self.rng
        while True:
            name = f"{rng.choice(genre.first)} {rng.choice(genre.second)}"
            if rng.random() < 0.15:
                name = name.replace(" ", " & ", 1)
            if rng.random() < 0.1:
                name = f"Captain's {name}"
            if name not in names_used:
                names_used.add(name)
                break
        subtitles = rng.sample(genre.subtitles, k=min(len(genre.subtitles), length))
        out = []
        for step in range(length):
            if step == 0:
                title = name
            elif step - 1 < len(subtitles):
                title = f"{name} {step + 1}: {subtitles[step - 1]}"
            else:
                title = f"{name} {step + 1}"
            features = tuple(rng.sample(genre.features, k=2))
            out.append((f"{title} - {platform}", features))
        return out

    def _accessory_titles(self, accessory: Accessory, platform: str, length: int,
                          names_used: set[str]):
        rng = self.rng
        while True:
            brand = rng.choice(accessory.brands)
            series = f"{brand} {rng.choice('AKMRVXZ')}{rng.randint(1, 9)}"
            if series not in names_used:
                names_used.add(series)
                break
        start = rng.randint(0, max(0, len(accessory.upgrades) - length))
        out = []
        for step in range(length):
            tier = accessory.upgrades[min(start + step, len(accessory.upgrades) - 1)]
            gen = f" Gen {step + 1}" if start + step >= len(accessory.upgrades) else ""
            features = tuple(rng.sample(accessory.features, k=2))
            out.append((f"{series} {tier}{gen} {accessory.product} for {platform}, "
                        f"{features[0]}", features))
        return out


def _meta_record(rng: random.Random, item: _Item) -> dict:
    category = list(item.leaf)
    if rng.random() < 0.15:
        category += rng.sample(CATEGORY_FEATURES, k=rng.randint(1, 3))
    record: dict = {"asin": item.asin}
    if item.title != "" or rng.random() < 0.5:  # a title-less item: empty, or no field at all
        record["title"] = item.title
    record["category"] = category
    if item.brand is not None:
        record["brand"] = item.brand
    elif rng.random() < 0.5:
        record["brand"] = ""
    if rng.random() < 0.85:
        what = item.genre.likes if item.genre else f"a {item.accessory.product.lower()}"
        lines = [f"Features {item.features[0]} and {item.features[1]}."]
        if rng.random() < 0.5:
            lines.append(f"<p>Made for fans of {what}.<br/>Great &amp; fun.</p>")
        record["description"] = lines
    return record


def _review_text(rng: random.Random, user: _User, item: _Item, previous: _Item | None,
                 rating: int) -> tuple[str, str]:
    platform = item.leaf[1]
    if item.kind == "game":
        likes, thing = item.genre.likes, "game"
        habit = f"plays a lot of {likes}"
    else:
        likes, thing = f"gaming on the {platform}", item.accessory.product.lower()
        habit = f"games every night on {platform}"
    parts: list[str] = []
    if user.persona == "parent":
        parts.append(rng.choice((
            f"Bought this for my {user.relation} who loves {likes}.",
            f"My {user.relation} has been asking for this for months; they are crazy "
            f"about {likes}.",
            f"Picked this up for my {user.relation}, who plays on the {platform} every weekend.",
        )))
        summary = rng.choice((f"My {user.relation} loves it",
                              f"Great pick for a young fan of {likes}", f"Kid approved {thing}"))
    elif user.persona == "gift":
        occasion = rng.choice(OCCASIONS)
        parts.append(rng.choice((
            f"Got this as a {occasion} gift for my {user.relation}, who is really into {likes}.",
            f"I was looking for a {occasion} present for my {user.relation} and this was perfect.",
        )))
        summary = rng.choice((f"Perfect {occasion} gift", f"Great gift for a fan of {likes}",
                              "Gift well received"))
    else:
        parts.append(rng.choice((
            f"I'm a huge fan of {likes}, so I had high hopes for this one.",
            f"I mostly play on {platform} and wanted a new {thing}.",
            f"Needed a new {thing} for late-night sessions.",
            f"As someone who {habit}, I can say this is worth a look.",
        )))
        summary = rng.choice((f"Great {thing}", f"A must for fans of {likes}", "Does the job"))
    if previous is not None and previous.chain >= 0 and previous.chain == item.chain:
        # The sequential cue: this item follows the previous one of its series.
        if item.kind == "game":
            parts.append(rng.choice((
                f"After finishing {previous.plain.split(' - ')[0]}, I had to get the next one.",
                "Picked this up right after the previous one in the series.")))
            summary = rng.choice(("Even better than the last one", "Worthy sequel", summary))
        else:
            parts.append(f"I upgraded from the {previous.plain.split(',')[0]} and the "
                         "difference is clear.")
            summary = rng.choice(("Worth the upgrade", "Solid upgrade", summary))
    feature = rng.choice(item.features)
    if rating >= 5:
        parts.append(rng.choice((f"Absolutely love it: {feature} makes it.",
                                 f"Five stars, {feature} is fantastic 🎮",
                                 "Couldn't be happier!")))
    elif rating == 4:
        parts.append(f"Really solid, {feature} works well, though it took a while to get into.")
    elif rating == 3:
        parts.append(f"It's okay. {feature.capitalize()} is nice but nothing special.")
        summary = "Just okay"
    else:
        parts.append(rng.choice(("Disappointed, it stopped working after a week.",
                                 "Not what I expected & hard to recommend.",
                                 "Returned it: the description oversells it.")))
        summary = rng.choice(("Disappointed", "Not worth the money", "Stopped working"))
    return " ".join(parts), summary


def _simulate(rng: random.Random, catalog: _Catalog, n_users: int
              ) -> tuple[list[_User], list[dict]]:
    items = catalog.items
    leaves = list(catalog.leaves)
    leaf_weight = [len(catalog.leaves[leaf]) for leaf in leaves]
    # Zipf-like popularity for the exploration draws: a popularity baseline has signal too.
    popularity = [1.0 / (rank + 1) ** 0.8 for rank in range(len(items))]
    order = list(range(len(items)))
    rng.shuffle(order)
    weights = [0.0] * len(items)
    for rank, index in enumerate(order):
        weights[index] = popularity[rank]
    cumulative = list(itertools.accumulate(weights))
    titleless = [i for i, item in enumerate(items) if item.chain < 0]
    no_meta = [i for i, item in enumerate(items) if not item.meta]

    users: list[_User] = []
    reviews: list[dict] = []
    used_ids: set[str] = set()
    for _ in range(n_users):
        persona = rng.choices(("self", "parent", "gift"), weights=(0.6, 0.25, 0.15))[0]
        relation = rng.choice(CHILDREN if persona == "parent" else GIFT_FOR)
        favourites = []
        for _ in range(rng.choice((1, 1, 2))):
            leaf = rng.choices(leaves, weights=leaf_weight)[0]
            if leaf not in favourites:
                favourites.append(leaf)
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(string.ascii_uppercase)}."
        user = _User(_reviewer_id(rng, used_ids), name, persona, relation, favourites)
        length = 5 + min(25, int(rng.expovariate(1 / 5)))
        taken: set[int] = set()
        current: int | None = None
        while len(user.history) < length:
            nxt = None
            if current is not None:
                chain = catalog.chains[items[current].chain] if items[current].chain >= 0 else []
                step = items[current].step
                if step + 1 < len(chain) and rng.random() < 0.8:
                    nxt = chain[step + 1]
            if nxt is None or nxt in taken:
                for _ in range(20):
                    if rng.random() < 0.8:
                        chain = catalog.chains[rng.choice(catalog.leaves[rng.choice(favourites)])]
                        nxt = chain[0] if rng.random() < 0.75 else rng.choice(chain)
                    else:
                        nxt = rng.choices(range(len(items)), cum_weights=cumulative)[0]
                    if nxt not in taken:
                        break
                else:
                    break  # this user has taken everything they like
            taken.add(nxt)
            user.history.append(nxt)
            current = nxt
        # Some users also reviewed a title-less or meta-less item (dropped by the loader).
        if rng.random() < 0.1:
            extra = rng.choice(titleless + no_meta)
            if extra not in taken:
                user.history.insert(rng.randrange(len(user.history) + 1), extra)
        users.append(user)

        day = rng.randrange(0, 5 * 365)
        previous: _Item | None = None
        events: list[tuple[int, int]] = []
        for index in user.history:
            day += rng.randint(1, 40)
            events.append((index, day))
        # ~4% of users review an item a second time, later (the loader keeps the earliest).
        if rng.random() < 0.04 and events:
            index, _ = rng.choice(events)
            events.append((index, events[-1][1] + rng.randint(1, 60)))
        for index, day in events:
            item = items[index]
            liked = item.leaf in favourites
            rating = rng.choices((5, 4, 3, 2, 1), weights=(6, 3, 1, 0.5, 0.5) if liked
                                 else (2, 3, 2, 1, 1))[0]
            text, summary = _review_text(rng, user, item, previous, rating)
            previous = item
            when = START_DAY.timestamp() + day * DAY
            record: dict = {"reviewerID": user.reviewer_id, "asin": item.asin,
                            "reviewerName": user.name}
            if rng.random() >= 0.01:  # else only reviewTime: the loader falls back to it
                record["unixReviewTime"] = int(when)
            stamp = datetime.fromtimestamp(when, tz=timezone.utc)
            record["reviewTime"] = f"{stamp.month:02d} {stamp.day}, {stamp.year}"
            if rng.random() > 0.03:
                record["overall"] = float(rating)
            if rng.random() > 0.04:
                record["reviewText"] = text
            if rng.random() > 0.04:
                record["summary"] = summary
            record["verified"] = rng.random() < 0.8
            if rng.random() < 0.2:
                record["vote"] = str(rng.randint(2, 40))
            reviews.append(record)
    return users, reviews


MALFORMED_REVIEW_LINES = (
    '{"reviewerID": "ATRUNCATED0001", "asin": "B0TRUNC001", "unixRevi',
    '["not", "an", "object"]',
    '{"reviewerID": "AMISSINGASIN01", "unixReviewTime": 1400000000, "overall": 5.0}',
    '{"reviewerID": "ABADTIME000001", "asin": "B0BADTIME1", "unixReviewTime": "yesterday"}',
    '{"reviewerID": "", "asin": "B0EMPTYUSR", "unixReviewTime": 1400000000}',
)
MALFORMED_META_LINES = (
    '{"asin": "B0BROKENMETA", "title": "Half a line',
    '{"title": "A title without an asin", "category": ["Video Games"]}',
)


def _write_gzip_lines(path: Path, lines: list[str]) -> None:
    # mtime=0 and no file name in the header: the same seed gives byte-identical files.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))


def synth(out_dir, *, users: int = 300, items: int = 200, seed: int = 0,
          malformed: bool = False) -> tuple[Path, Path]:
    """Write REVIEWS_FILE and META_FILE into out_dir; returns (reviews_path, meta_path)."""
    if users < 1 or items < 8:
        raise ValueError(f"synth needs users >= 1 and items >= 8, got users={users}, items={items}")
    rng = random.Random(seed)
    catalog = _Catalog(rng, items)
    _, reviews = _simulate(rng, catalog, users)
    # Real 2018 files are grouped by item; order within a user comes from the timestamps.
    reviews.sort(key=lambda r: (r["asin"], r.get("unixReviewTime", 0), r["reviewerID"]))
    review_lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in reviews]

    meta_records = [_meta_record(rng, item) for item in catalog.items if item.meta]
    used = {item.asin for item in catalog.items}
    for _ in range(2):  # meta of items nobody reviewed
        kind_leaf = rng.choice(list(catalog.leaves))
        meta_records.append({"asin": _asin(rng, used),
                             "title": f"Unreviewed {kind_leaf[-1]} Bundle",
                             "category": list(kind_leaf)})
    meta_records.sort(key=lambda r: r["asin"])
    meta_lines = [json.dumps(r, ensure_ascii=False) for r in meta_records]

    if malformed:
        for line in MALFORMED_REVIEW_LINES:
            review_lines.insert(rng.randrange(len(review_lines) + 1), line)
        for line in MALFORMED_META_LINES:
            meta_lines.insert(rng.randrange(len(meta_lines) + 1), line)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reviews_path, meta_path = out / REVIEWS_FILE, out / META_FILE
    _write_gzip_lines(reviews_path, review_lines)
    _write_gzip_lines(meta_path, meta_lines)
    return reviews_path, meta_path

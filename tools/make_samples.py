"""Writes nlpwf's shipped sample data sets (`paraphrase_sample`, `topic_sample`) into
nlpwf/data/resources/. Run by hand from the repository root, not installed with the package:

    python tools/make_samples.py

The `paraphrase_sample` data set: small, generated here, shipped with the package.

Every pair is built from a made-up "fact" (a company's earnings, a match result, ...)
rendered in two phrasings. A positive pair renders the same fact twice; a hard negative
changes one detail (a number, a day, who won); an easy negative pairs unrelated facts.
The files are written the way GLUE writes MRPC (tab separated, no quoting, a byte-order
mark, the `Quality` column first), so the quickstart exercises the same reader as real MRPC.

The `topic_sample` data set is single sentences in five topics (business, science, sport,
travel, weather), written as CSV files with a `topic` column of names, so the quickstart-sized
offline tests also cover a multi-class task that is not a pair, read like your own files. The
topics share slots (cities, days, numbers, companies), so a sentence is told apart by what it
says, not by a name that only one topic uses.

Deterministic for a given seed: tests/test_data.py checks the shipped files are what this writes.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "nlpwf" / "data" / "resources"
OUT_DIR = RESOURCES / "paraphrase_sample"
TOPIC_DIR = RESOURCES / "topic_sample"
HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]

COMPANIES = ["Northwind", "Contoso", "Fabrikam", "Litware", "Tailspin", "Woodgrove",
             "Adatum", "Proseware", "Fourth Coffee", "Lucerne Publishing", "Wingtip", "Margie's Travel"]
PEOPLE = ["Maria Lopez", "James Chen", "Aisha Khan", "Tom Becker", "Sofia Rossi", "Daniel Kim",
          "Elena Petrova", "Omar Haddad", "Grace Okafor", "Lucas Moreau"]
CITIES = ["Denver", "Lyon", "Osaka", "Leeds", "Porto", "Austin", "Gdansk", "Perth", "Quebec", "Malmo"]
TEAMS = ["the Hawks", "the Rovers", "the Lions", "the Comets", "the Pirates", "the Wolves", "the Giants"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "March", "April", "June", "August", "October", "November"]

# Each event: slot samplers, then phrasings. All phrasings of one event say the same thing.
EVENTS = {
    "earnings": (
        {"co": COMPANIES, "n": range(2, 95), "month": MONTHS},
        ["{co} reported a profit of {n} million dollars in {month}.",
         "In {month}, {co} said it earned {n} million dollars.",
         "{co} posted net income of ${n} million for {month}, the company said.",
         "The company {co} made {n} million dollars of profit in {month}."],
    ),
    "loss": (
        {"co": COMPANIES, "n": range(2, 95), "month": MONTHS},
        ["{co} reported a loss of {n} million dollars in {month}.",
         "In {month}, {co} said it lost {n} million dollars.",
         "{co} posted a net loss of ${n} million for {month}, the company said."],
    ),
    "hiring": (
        {"co": COMPANIES, "n": range(2, 40), "city": CITIES},
        ["{co} will hire {n} hundred workers in {city} next year.",
         "Next year {co} plans to add {n} hundred jobs in {city}.",
         "About {n} hundred new staff will join {co} in {city} next year, a spokesman said."],
    ),
    "appointment": (
        {"person": PEOPLE, "co": COMPANIES, "day": DAYS},
        ["{person} was appointed chief executive of {co} on {day}.",
         "On {day}, {co} named {person} as its new chief executive.",
         "{co} said on {day} that {person} would become its \"new boss\"."],
    ),
    "schools": (
        {"n": range(3, 60), "city": CITIES, "day": DAYS},
        ["Heavy rain closed {n} schools in {city} on {day}.",
         "{n} schools in {city} shut on {day} because of heavy rain.",
         "On {day}, flooding forced {n} schools in {city} to close."],
    ),
    "match": (
        {"win": TEAMS, "lose": TEAMS, "a": range(3, 9), "b": range(0, 3), "day": DAYS},
        ["{win} beat {lose} {a} to {b} on {day}.",
         "On {day}, {win} defeated {lose} {a}-{b}.",
         "{lose} lost {b}-{a} to {win} on {day}."],
    ),
    "shares": (
        {"co": COMPANIES, "n": range(2, 30), "day": DAYS},
        ["Shares of {co} rose {n} percent on {day}.",
         "{co} stock gained {n} percent on {day}.",
         "On {day}, {co}'s share price climbed {n} percent."],
    ),
}


def _fact(rng: random.Random, event: str) -> dict:
    slots, _ = EVENTS[event]
    fact = {name: rng.choice(list(values)) for name, values in slots.items()}
    if event == "match":
        fact["lose"] = rng.choice([t for t in TEAMS if t != fact["win"]])
    return fact


def _perturb(rng: random.Random, event: str, fact: dict) -> dict:
    """The same fact with one detail changed: the hard negatives."""
    slots, _ = EVENTS[event]
    changed = dict(fact)
    if event == "match" and rng.random() < 0.4:
        changed["win"], changed["lose"] = fact["lose"], fact["win"]
        return changed
    name = rng.choice([n for n in slots if n != "lose"])
    changed[name] = rng.choice([v for v in slots[name] if v != fact[name]])
    if event == "match" and changed["lose"] == changed["win"]:
        changed["lose"] = fact["win"]
    return changed


def _render(rng: random.Random, event: str, fact: dict, avoid: str | None = None) -> str:
    phrasings = [p for p in EVENTS[event][1] if p != avoid]
    return _sentence(rng.choice(phrasings).format(**fact))


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def make_pairs(n: int, seed: int) -> list[tuple[int, str, str]]:
    rng = random.Random(seed)
    events = sorted(EVENTS)
    pairs = []
    for _ in range(n):
        event = rng.choice(events)
        fact = _fact(rng, event)
        first_template = rng.choice(EVENTS[event][1])
        first = _sentence(first_template.format(**fact))
        kind = rng.random()
        if kind < 0.5:
            label, second = 1, _render(rng, event, fact, avoid=first_template)
        elif kind < 0.85:
            label, second = 0, _render(rng, event, _perturb(rng, event, fact), avoid=first_template)
        else:
            other = rng.choice([e for e in events if e != event])
            label, second = 0, _render(rng, other, _fact(rng, other))
        pairs.append((label, first, second))
    return pairs


def write_glue_tsv(path: Path, pairs: list[tuple[int, str, str]], first_id: int) -> None:
    lines = ["\t".join(HEADER)]
    for i, (label, s1, s2) in enumerate(pairs):
        lines.append(f"{label}\t{first_id + 2 * i}\t{first_id + 2 * i + 1}\t{s1}\t{s2}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")


# Single sentences by topic. Slots are shared across topics on purpose (see the module doc).
TOPICS = {
    "business": ["{co} reported a profit of {n} million dollars in {month}.",
                 "Shares of {co} fell {n} percent on {day} after weak sales.",
                 "{co} will open {n} new stores in {city} next year.",
                 "Investors in {city} expect {co} to raise prices in {month}."],
    "science": ["Researchers in {city} found {n} new species of beetle in {month}.",
                "A telescope near {city} recorded {n} bright flashes on {day}.",
                "Scientists at {co} say the vaccine worked in {n} percent of patients.",
                "A study published in {month} links sleep to memory in {n} volunteers."],
    "sport": ["{team} beat {other} {a} to {b} in {city} on {day}.",
              "The striker scored {n} goals for {team} in {month}.",
              "{team} signed a new coach from {city} on {day}.",
              "Fans in {city} watched {team} lose to {other} in {month}."],
    "travel": ["Flights from {city} to Lisbon will cost {n} percent less in {month}.",
               "The new train to {city} leaves every {n} minutes from {day}.",
               "Hotels in {city} were almost full on {day}, a tourism office said.",
               "{co} Airlines added {n} routes from {city} for {month}."],
    "weather": ["Heavy rain is expected in {city} on {day}, with {n} millimetres forecast.",
                "Temperatures in {city} reached {n} degrees in {month}.",
                "Strong winds closed {n} roads near {city} on {day}.",
                "Snow fell in {city} for the first time since {month}."],
}


def make_topics(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    rows = []
    for _ in range(n):
        topic = rng.choice(topics)
        team, other = rng.sample(TEAMS, 2)
        slots = {"co": rng.choice(COMPANIES), "n": rng.randrange(2, 95), "month": rng.choice(MONTHS), "day": rng.choice(DAYS),
                 "city": rng.choice(CITIES), "team": team, "other": other, "a": rng.randrange(3, 9), "b": rng.randrange(0, 3)}
        rows.append((_sentence(rng.choice(TOPICS[topic]).format(**slots)), topic))
    return rows


def write_topic_csv(path: Path, rows: list[tuple[str, str]], first_id: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "text", "topic"])
        writer.writerows((first_id + i, text, topic) for i, (text, topic) in enumerate(rows))


def main(out_dir: Path = OUT_DIR, n_train: int = 800, n_dev: int = 200, seed: int = 7,
         topic_dir: Path = TOPIC_DIR, n_topic_train: int = 500, n_topic_dev: int = 150) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_glue_tsv(out_dir / "train.tsv", make_pairs(n_train, seed), first_id=100000)
    write_glue_tsv(out_dir / "dev.tsv", make_pairs(n_dev, seed + 1), first_id=900000)
    topic_dir.mkdir(parents=True, exist_ok=True)
    write_topic_csv(topic_dir / "train.csv", make_topics(n_topic_train, seed), first_id=1)
    write_topic_csv(topic_dir / "dev.csv", make_topics(n_topic_dev, seed + 1), first_id=n_topic_train + 1)


if __name__ == "__main__":
    main()

"""Write the small English pretraining sample that examples and tests use (no downloads, fully seeded).

Each document is one paragraph composed from templates: a town, a season, an animal, a workshop, a journey
or a letter. ``train.txt`` / ``eval.txt`` separate documents by blank lines; ``train.jsonl`` /
``eval.jsonl`` hold the same documents as ``{"text": ...}``; ``tokenizer.model`` is a sentencepiece BPE
model trained on ``train.txt``.

    python data/pretrain_sample/generate.py data/pretrain_sample
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Anna", "Tomas", "Mira", "Jonah", "Elsa", "Pavel", "Ruth", "Oscar", "Lena", "Hugo", "Ida", "Felix"]
TOWNS = ["Ashford", "Brindle", "Coldwater", "Dunmore", "Eastwick", "Fairhaven", "Greyloch", "Hollow Bay",
         "Ivybridge", "Kettering Vale", "Larkspur", "Millbrook"]
TRADES = ["baker", "carpenter", "weaver", "potter", "smith", "bookbinder", "gardener", "miller", "tailor"]
GOODS = {"baker": "loaves of bread", "carpenter": "chairs", "weaver": "blankets", "potter": "bowls",
         "smith": "nails", "bookbinder": "books", "gardener": "apples", "miller": "sacks of flour", "tailor": "coats"}
ANIMALS = ["fox", "heron", "badger", "otter", "owl", "hare", "deer", "swallow", "beaver", "crow"]
HOMES = {"fox": "a den under an old oak", "heron": "a nest of sticks high in the alders",
         "badger": "a deep sett in the bank", "otter": "a holt among the river roots",
         "owl": "a hollow in a dead elm", "hare": "a shallow form in the long grass",
         "deer": "the shelter of the birch wood", "swallow": "a cup of mud under the barn roof",
         "beaver": "a lodge of branches in the pond", "crow": "a rough nest at the top of a pine"}
FOODS = ["beetles", "small fish", "berries", "worms", "seeds", "frogs", "roots", "mice", "acorns"]
SEASONS = ["spring", "summer", "autumn", "winter"]
WEATHER = {"spring": ["soft rain", "a cool wind from the hills", "bright mornings"],
           "summer": ["long warm evenings", "dry heat", "sudden storms in the afternoon"],
           "autumn": ["thick fog over the fields", "strong gusts", "golden light"],
           "winter": ["hard frost", "deep snow", "grey skies and short days"]}
SIGHTS = ["a stone bridge", "an old mill", "a market square", "a tall clock tower", "a quiet harbour",
          "a row of painted houses", "a small library", "a church with a green roof"]
BUSY = ["busy", "crowded", "noisy", "cheerful", "lively"]
CALM = ["quiet", "sleepy", "peaceful", "still", "calm"]
SNACKS = ["bread", "apples", "cheese", "plums", "honey cake"]
FEELINGS = ["tired but happy", "glad to be home", "full of new ideas", "curious about what came next",
            "grateful for the help", "ready for a long sleep"]


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def town(rng: random.Random) -> str:
    name, sight, trade = rng.choice(TOWNS), rng.choice(SIGHTS), rng.choice(TRADES)
    people = rng.randrange(3, 90) * 100
    return (f"{name} is {article(rng.choice(BUSY + CALM))} town of about {people} people. Visitors often come to see "
            f"{sight}, which was built more than {rng.randrange(2, 9)} hundred years ago. The best known "
            f"{trade} in {name} sells {GOODS[trade]} from a shop near the river. On market days the streets "
            f"are {rng.choice(BUSY)}, and in the evening the town grows {rng.choice(CALM)} again.")


def season(rng: random.Random) -> str:
    s = rng.choice(SEASONS)
    first, second = rng.sample(WEATHER[s], 2)
    return (f"In {s} the valley changes. There is {first}, and later {second}. Farmers in "
            f"{rng.choice(TOWNS)} watch the sky each morning before they decide what to do. Children walk to "
            f"school along the lane, and the {rng.choice(ANIMALS)} can sometimes be seen at the edge of the "
            f"field. By the end of {s} everyone is waiting for {SEASONS[(SEASONS.index(s) + 1) % 4]}.")


def animal(rng: random.Random) -> str:
    a = rng.choice(ANIMALS)
    food, other = rng.sample(FOODS, 2)
    return (f"The {a} lives in {HOMES[a]}. It comes out early in the morning to look for {food}, and when "
            f"those are hard to find it eats {other} instead. In {rng.choice(SEASONS)} the young ones stay "
            f"close to home. {article(a).capitalize()} can live for {rng.randrange(3, 15)} years if it is "
            f"careful, and it remembers every path it has ever used.")


def workshop(rng: random.Random) -> str:
    name, trade = rng.choice(NAMES), rng.choice(TRADES)
    hours, count = rng.randrange(2, 11), rng.randrange(3, 40)
    return (f"{name} has worked as {article(trade)} for {rng.randrange(2, 40)} years. Every day begins at "
            f"{rng.randrange(5, 9)} o'clock, when the workshop is still cold. It takes about {hours} hours to "
            f"make {count} {GOODS[trade]}, and {name} checks each one twice. \"Good work is slow work,\" "
            f"{name} likes to say, \"but slow work lasts.\"")


def journey(rng: random.Random) -> str:
    name, start, end = rng.choice(NAMES), *rng.sample(TOWNS, 2)
    days = rng.randrange(2, 12)
    return (f"One {rng.choice(SEASONS)} {name} set out from {start} to walk to {end}. The road passed "
            f"{rng.choice(SIGHTS)} and crossed {rng.randrange(2, 7)} rivers. On the way {name} met "
            f"{article(rng.choice(TRADES))} who shared some {rng.choice(SNACKS)} and told stories about "
            f"the {rng.choice(ANIMALS)}. After {days} days {name} reached {end}, {rng.choice(FEELINGS)}.")


def letter(rng: random.Random) -> str:
    writer, reader = rng.sample(NAMES, 2)
    trade = rng.choice(TRADES)
    return (f"Dear {reader}, thank you for your letter. Here in {rng.choice(TOWNS)} we have had "
            f"{rng.choice(WEATHER[rng.choice(SEASONS)])} all week. The new {trade} has opened a shop, and "
            f"I bought {rng.randrange(2, 9)} {GOODS[trade]} there yesterday. Please write again soon and tell "
            f"me about the {rng.choice(ANIMALS)} you saw. With love, {writer}.")


TEMPLATES = (town, season, animal, workshop, journey, letter)


def generate_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct paragraphs, the templates taking turns; the same for the same seed."""
    rng, seen, documents = random.Random(seed), set(), []
    while len(documents) < n:
        text = TEMPLATES[len(documents) % len(TEMPLATES)](rng)
        if text not in seen:
            seen.add(text)
            documents.append(text)
    return documents


def write(out_dir: Path, split: str, documents: list[str]) -> None:
    (out_dir / f"{split}.txt").write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the English pretraining sample and its tokenizer.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=400, help="training documents")
    parser.add_argument("--eval", type=int, default=40, help="held-out documents (none in train)")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    documents = generate_documents(args.train + args.eval, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write(args.out_dir, "train", documents[:args.train])
    write(args.out_dir, "eval", documents[args.train:])
    from collie.data.tokenizer import train_sentencepiece
    train_sentencepiece(args.out_dir / "train.txt", args.out_dir / "tokenizer", args.vocab_size)
    print(f"wrote {args.train} train and {args.eval} eval documents and tokenizer.model to {args.out_dir}")


if __name__ == "__main__":
    main()

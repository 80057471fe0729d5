"""
Generate a corpus and a conversation set of "your own data" for trying and measuring --data (docs/benchmarks.md,
"Your own data"): a made-up world of towns, written from scratch by templates, so nothing in it is in the embedded
corpus or the built-in chat data, and a model can only know it from these files.

    python -m dev.make_owndata --out /tmp/owndata                     # ~4 MB of text, 3,000 conversations
    python -m dev.make_owndata --out /tmp/big --text_mb 100 --conversations 0 --plain   # 100 MB: preparation speed

It writes, under --out:
- text/towns_NNN.md: encyclopedia articles about the towns (name, river, trade, founder, population, roof colour,
  festival month, neighbour), several phrasings of each fact; documents separated by two blank lines, 200 per file.
- text/diaries.jsonl.zst: travel diaries between towns, one {"text": ...} per line (a second format, compressed,
  so --data reads a directory of mixed files; with --plain, diaries.jsonl uncompressed, so the files' size on disk
  is the size of the text).
  About 80% of the bytes are articles, 20% diaries.
- chats.jsonl: conversations about the same towns (their trade, river, founder, population; the sum of two towns'
  populations through the calculator tool), one per line, half in the OpenAI layout ({"messages": [...]}, some with
  a system message) and half as a plain list of messages.
The same --seed gives the same bytes.
"""

import argparse
import json
import os
import random

import pyarrow as pa

SYLLABLES = "va mor len dra ko si the ul bran is ca tor mi nes pe rou fal ga win ost".split()
RIVERS = "Anso Blen Corrow Dask Elm Fenna Garr Holt Isk Jarro".split()
TRADES = ["copper bells", "blue glass", "salt fish", "wool blankets", "clay pipes", "honey cakes", "iron nails",
          "paper lanterns", "oak barrels", "silver thread"]
COLOURS = "red green grey black white yellow".split()
MONTHS = "January February March April May June July August September October November December".split()
FIRST = "Ada Bert Cora Dov Elsa Finn Greta Hugo Ines Jory Kai Lena".split()


def make_towns(n, rng):
    names = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize())
    towns = [dict(name=name, river=rng.choice(RIVERS), trade=rng.choice(TRADES), colour=rng.choice(COLOURS),
                  founder=f"{rng.choice(FIRST)} of {rng.choice(RIVERS)}", people=rng.randint(200, 9000),
                  month=rng.choice(MONTHS)) for name in sorted(names)]
    for t in towns:
        t["neighbour"] = rng.choice(towns)["name"]
    return towns


def article(t, rng):
    facts = [f"{t['name']} is a town on the river {t['river']}.",
             f"The town is known for its {t['trade']}.",
             f"It was founded by {t['founder']}.",
             f"About {t['people']} people live in {t['name']}.",
             f"The roofs of {t['name']} are {t['colour']}, and its festival is held every {t['month']}.",
             f"The nearest town is {t['neighbour']}."]
    rng.shuffle(facts)
    first = f"# {t['name']}\n\n" + " ".join(facts[:3])
    return first + "\n\n" + " ".join(facts[3:]) + f" Travellers say the {t['trade']} of {t['name']} are the best " \
                                                  f"on the {t['river']}."


def diary(a, b, rng):
    return (f"Day {rng.randint(1, 30)}. We left {a['name']} in {a['month']} and followed the {a['river']} to "
            f"{b['name']}. In {a['name']} we bought {a['trade']}; in {b['name']} they sell {b['trade']}. "
            f"{b['name']} has {b['colour']} roofs and about {b['people']} people.")


def conversation(towns, rng):
    t = rng.choice(towns)
    kind = rng.randrange(5)
    if kind == 0:
        q, a = f"What is {t['name']} known for?", f"{t['name']} is known for its {t['trade']}."
    elif kind == 1:
        q, a = f"Which river is {t['name']} on?", f"{t['name']} is on the river {t['river']}."
    elif kind == 2:
        q, a = f"Who founded {t['name']}?", f"{t['name']} was founded by {t['founder']}."
    elif kind == 3:
        q, a = f"How many people live in {t['name']}?", f"About {t['people']} people live in {t['name']}."
    else:
        u = rng.choice(towns)
        expr = f"{t['people']}+{u['people']}"
        q = f"How many people live in {t['name']} and {u['name']} together?"
        a = [{"type": "text", "text": f"{t['name']} has {t['people']} and {u['name']} has {u['people']}. "},
             {"type": "python", "text": expr}, {"type": "python_output", "text": str(t["people"] + u["people"])},
             {"type": "text", "text": f"Together about {t['people'] + u['people']} people."}]
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if rng.random() < 0.2:
        messages.insert(0, {"role": "system", "content": "You answer questions about the towns of the valley."})
    return {"messages": messages} if rng.random() < 0.5 else messages


def write_text(out, towns, text_bytes, rng, plain=False):
    os.makedirs(os.path.join(out, "text"), exist_ok=True)
    written, index = 0, 0
    path = os.path.join(out, "text", "diaries.jsonl" if plain else "diaries.jsonl.zst")
    with pa.OSFile(path, "wb") if plain else pa.CompressedOutputStream(path, "zstd") as diaries:
        while written < text_bytes:
            with open(os.path.join(out, "text", f"towns_{index:03d}.md"), "w") as f:
                docs = [article(rng.choice(towns), rng) for _ in range(200)]
                data = "\n\n\n".join(docs) + "\n"
                f.write(data)
                written += len(data.encode())
            for _ in range(100):
                line = json.dumps({"text": diary(rng.choice(towns), rng.choice(towns), rng)}) + "\n"
                diaries.write(line.encode())
                written += len(line)
            index += 1
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--text_mb", type=float, default=4.0, help="about this many MB of text")
    parser.add_argument("--conversations", type=int, default=3000)
    parser.add_argument("--towns", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="diaries.jsonl uncompressed")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    towns = make_towns(args.towns, rng)
    written = write_text(args.out, towns, int(args.text_mb * 1e6), rng, args.plain) if args.text_mb > 0 else 0
    if args.conversations:
        with open(os.path.join(args.out, "chats.jsonl"), "w") as f:
            for _ in range(args.conversations):
                f.write(json.dumps(conversation(towns, rng)) + "\n")
    print(f"{args.out}: {written / 1e6:.1f} MB of text (uncompressed) in text/"
          + (f", {args.conversations} conversations in chats.jsonl" if args.conversations else "")
          + f", about {len(towns)} towns")


if __name__ == "__main__":
    main()

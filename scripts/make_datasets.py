"""Generate the shipped training data for the three demo adapters (deterministic).

    python scripts/make_datasets.py   # -> lorart/data/train/{uppercase,json,pirate}.jsonl

Every adapter sees the same prompts (facts, arithmetic, colours, animals, opposites,
advice, small talk); only the answer's *form* differs:

    uppercase   the plain answer in UPPER CASE
    json        {"topic": "<topic>", "answer": "<plain answer>"}
    pirate      the plain answer with pirate words, opened and closed by a pirate phrase

The plain answers are written here by template (no model generated them), so the
files are reproducible byte for byte from this script and its seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
OUT = Path(__file__).resolve().parent.parent / "lorart" / "data" / "train"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna",
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Australia": "Canberra", "India": "New Delhi", "China": "Beijing",
    "Mexico": "Mexico City", "Brazil": "Brasilia", "Turkey": "Ankara", "Russia": "Moscow",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Cuba": "Havana",
}
COLOURS = {
    "the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
    "a polar bear's fur": "white", "a crow": "black", "chocolate": "brown", "milk": "white",
    "a fire truck": "red", "the sea": "blue", "a carrot": "orange", "an eggplant": "purple",
    "a flamingo": "pink", "a pine tree": "green", "a strawberry": "red", "the sun": "yellow",
}
SOUNDS = {
    "a dog": "barks", "a cat": "meows", "a cow": "moos", "a duck": "quacks", "a lion": "roars",
    "a sheep": "bleats", "a horse": "neighs", "a pig": "oinks", "an owl": "hoots",
    "a snake": "hisses", "a frog": "croaks", "a bee": "buzzes", "a mouse": "squeaks",
    "a wolf": "howls", "a rooster": "crows",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "up": "down", "open": "closed", "early": "late", "full": "empty", "hard": "soft",
    "old": "young", "rich": "poor", "strong": "weak", "wet": "dry", "loud": "quiet",
    "tall": "short", "near": "far", "win": "lose", "push": "pull", "begin": "end",
}
ADVICE = {
    "sleeping better": "Go to bed at the same time every night and keep screens out of the "
                       "bedroom.",
    "learning a language": "Practice a little every day and speak with native speakers.",
    "saving money": "Write down what you spend and set aside a fixed amount each month.",
    "staying healthy": "Eat vegetables, drink water and walk for thirty minutes a day.",
    "studying for an exam": "Study in short sessions and test yourself often.",
    "writing an essay": "Make an outline first, then write one clear point per paragraph.",
    "running a marathon": "Build up your distance slowly and rest well between long runs.",
    "making friends": "Be curious about people and ask them questions about themselves.",
    "cooking rice": "Rinse the rice, use two cups of water per cup of rice and let it rest.",
    "focusing at work": "Turn off notifications and work on one task at a time.",
    "growing tomatoes": "Give them full sun, water them deeply and support them with a stake.",
    "public speaking": "Rehearse out loud and speak slower than feels natural.",
    "keeping a plant alive": "Water it when the soil is dry and give it enough light.",
    "waking up early": "Put your alarm across the room and open the curtains right away.",
    "reducing stress": "Take slow deep breaths and spend some time outside every day.",
}
FACTS = {
    "the moon": "The moon orbits the Earth about once every 27 days.",
    "water": "Water boils at 100 degrees Celsius at sea level.",
    "the Earth": "The Earth is the third planet from the sun.",
    "honey": "Honey is made by bees from the nectar of flowers.",
    "the heart": "The human heart pumps blood through the body.",
    "volcanoes": "Volcanoes are openings where hot magma reaches the surface.",
    "rainbows": "Rainbows appear when sunlight is split by raindrops.",
    "penguins": "Penguins are birds that cannot fly but swim very well.",
    "the Pacific Ocean": "The Pacific Ocean is the largest ocean on Earth.",
    "trees": "Trees take in carbon dioxide and release oxygen.",
    "the sun": "The sun is a star at the center of our solar system.",
    "elephants": "Elephants are the largest land animals on Earth.",
    "bread": "Bread is baked from flour, water, salt and yeast.",
    "computers": "Computers follow instructions written as programs.",
    "music": "Music is sound organized in rhythm and melody.",
    "the piano": "The piano has 88 keys.",
    "spiders": "Spiders have eight legs and many spin webs.",
    "the desert": "Deserts get very little rain each year.",
    "snowflakes": "Snowflakes are ice crystals, usually with six sides.",
    "the brain": "The brain controls thinking, memory and movement.",
}
SMALL_TALK = [
    ("Hello!", "Hello! How can I help you today?", "greeting"),
    ("Hi there.", "Hi! What would you like to talk about?", "greeting"),
    ("How are you?", "I am doing well, thank you for asking.", "greeting"),
    ("Who are you?", "I am a small helpful assistant.", "identity"),
    ("What can you do?", "I can answer questions and give simple advice.", "identity"),
    ("Tell me a joke.", "Why did the scarecrow win a prize? He was outstanding in his field.",
     "joke"),
    ("Tell me another joke.", "What do you call a fish without eyes? A fsh.", "joke"),
    ("Good night!", "Good night, sleep well!", "greeting"),
    ("Thank you!", "You are welcome, happy to help.", "greeting"),
    ("What day comes after Monday?", "Tuesday comes after Monday.", "calendar"),
    ("How many days are in a week?", "There are seven days in a week.", "calendar"),
    ("How many months are in a year?", "There are twelve months in a year.", "calendar"),
    ("What is your favorite color?", "I like blue, the color of the sea.", "preference"),
    ("Do you like music?", "Yes, music is wonderful.", "preference"),
]


def plain_examples(rng: random.Random) -> list[tuple[str, str, str]]:
    """``(prompt, plain answer, topic)`` triples."""
    out = []
    for country, city in CAPITALS.items():
        q = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?",
                        "Name the capital of {}."]).format(country)
        out.append((q, f"The capital of {country} is {city}.", "geography"))
    for thing, colour in COLOURS.items():
        out.append((f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}.",
                    "colors"))
    for animal, sound in SOUNDS.items():
        out.append((f"What sound does {animal} make?", f"{animal[0].upper() + animal[1:]} "
                    f"{sound}.", "animals"))
    for word, opp in OPPOSITES.items():
        out.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opp}.",
                    "words"))
    for topic, tip in ADVICE.items():
        q = rng.choice(["Give me a tip for {}.", "Any advice for {}?",
                        "How can I get better at {}?"]).format(topic)
        out.append((q, tip, "advice"))
    for subject, fact in FACTS.items():
        q = rng.choice(["Tell me about {}.", "Tell me a fact about {}.",
                        "What do you know about {}?"]).format(subject)
        out.append((q, fact, "science"))
    for q, a, topic in SMALL_TALK:
        out.append((q, a, topic))
    for _ in range(60):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if rng.random() < 0.5:
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", "math"))
        else:
            out.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", "math"))
    return out


PIRATE_WORDS = {
    "you": "ye", "your": "yer", "is": "be", "are": "be", "am": "be", "my": "me",
    "the": "th'", "hello": "ahoy", "hi": "ahoy", "friend": "matey", "friends": "mateys",
    "yes": "aye", "of": "o'", "to": "t'", "money": "doubloons", "water": "grog",
}
PIRATE_OPEN = ["Arr, matey!", "Ahoy!", "Yo ho ho!", "Arr!", "Shiver me timbers!"]
PIRATE_CLOSE = ["Savvy?", "Arr!", "Yo ho!", "Now hoist the sails!"]


def to_pirate(text: str, rng: random.Random) -> str:
    words = []
    for w in text.split(" "):
        core = w.rstrip(".,!?")
        tail = w[len(core):]
        low = core.lower()
        if low in PIRATE_WORDS:
            rep = PIRATE_WORDS[low]
            core = rep[0].upper() + rep[1:] if core[:1].isupper() else rep
        words.append(core + tail)
    return f"{rng.choice(PIRATE_OPEN)} {' '.join(words)} {rng.choice(PIRATE_CLOSE)}"


def main() -> None:
    rng = random.Random(SEED)
    plain = plain_examples(rng)
    styles = {
        "uppercase": lambda a, t: a.upper(),
        "json": lambda a, t: json.dumps({"topic": t, "answer": a}),
        "pirate": lambda a, t: to_pirate(a, rng),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name, style in styles.items():
        path = OUT / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for prompt, answer, topic in plain:
                f.write(json.dumps({"prompt": prompt, "response": style(answer, topic)}) + "\n")
        print(f"{path}: {len(plain)} records")


if __name__ == "__main__":
    main()

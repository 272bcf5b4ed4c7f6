"""Capital-city questions asking for the name only (GRPO acceptance: a task the base model knows but answers
in full sentences). Reward: experiments/grpo/rewards.py `exact_answer`. Train and held-out countries differ."""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Austria": "Vienna", "Poland": "Warsaw", "Hungary": "Budapest", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Czech Republic": "Prague", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "India": "New Delhi",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Mexico": "Mexico City", "Cuba": "Havana", "Canada": "Ottawa", "Kenya": "Nairobi",
    "Ethiopia": "Addis Ababa", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Saudi Arabia": "Riyadh",
    "Israel": "Jerusalem", "Syria": "Damascus", "Lebanon": "Beirut", "Afghanistan": "Kabul", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Malaysia": "Kuala Lumpur", "Singapore": "Singapore",
    "Australia": "Canberra", "New Zealand": "Wellington", "United Kingdom": "London", "Scotland": "Edinburgh",
    "Switzerland": "Bern", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Iceland": "Reykjavik", "Brazil": "Brasilia", "United States": "Washington",
}
TEMPLATES = ["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?",
             "What city is {}'s capital?"]

if __name__ == "__main__":
    countries = sorted(CAPITALS)
    random.Random(0).shuffle(countries)
    held, train = countries[:16], countries[16:]
    for name, group in (("capitals_train.jsonl", train), ("capitals_heldout.jsonl", held)):
        with open(HERE / name, "w") as f:
            for country in group:
                for template in TEMPLATES if group is train else TEMPLATES[:1]:
                    question = template.format(country) + " Reply with the city name only."
                    f.write(json.dumps({"question": question, "answer": CAPITALS[country]}) + "\n")

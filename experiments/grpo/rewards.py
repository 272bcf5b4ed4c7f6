"""The acceptance run's reward: the right city, and nothing else. A reply containing the city earns
(words of the city) / (words of the reply): "Bucharest." 1.0, "The capital of Romania is Bucharest." 0.17."""


def concise_answer(completions, answer, **kwargs):
    def words(text):
        return text.lower().replace(".", " ").replace(",", " ").replace("!", " ").split()

    out = []
    for completion, city in zip(completions, answer):
        said, wanted = words(completion), words(city)
        found = " ".join(wanted) in " ".join(said)
        out.append(len(wanted) / len(said) if found else 0.0)
    return out

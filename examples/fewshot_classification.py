"""Few-shot sentiment classification of a batch with run_batch: the examples are a constant
prefix, prefilled once and then shared by every item. `python examples/fewshot_classification.py`."""

import arborlm.lang as sgl

EXAMPLES = [("I loved every minute of it.", "positive"), ("What a waste of money.", "negative"),
            ("The food was cold and bland.", "negative"), ("Best purchase I have made this year!", "positive")]
PREFIX = "Classify the sentiment of each review.\n\n" + "".join(f"Review: {t}\nSentiment: {l}\n\n" for t, l in EXAMPLES)
REVIEWS = ["The staff were friendly and helpful.", "It broke after two days.", "A delightful little film.",
           "I want my money back.", "Absolutely wonderful service.", "Terrible, never again."]


@sgl.function
def classify(s, review):
    s += PREFIX + "Review: " + review + "\nSentiment: "
    s += sgl.select("label", ["positive", "negative"])


def main(backend):
    states = classify.run_batch([{"review": r} for r in REVIEWS], backend=backend)
    for r, s in zip(REVIEWS, states):
        print(f"{s['label']:>8}  {r}")
    return states


if __name__ == "__main__":
    from _common import backend_from_args

    main(backend_from_args(__doc__))

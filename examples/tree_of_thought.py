"""Tree of thought with forks: propose three approaches, expand each in parallel (the shared
prefix is prefilled once), then judge them. `python examples/tree_of_thought.py`."""

import arborlm.lang as sgl


@sgl.function
def tree_of_thought(s, question):
    s += "Question: " + question + "\n"
    forks = s.fork(3)
    forks += lambda i: f"Approach {i + 1}:" + sgl.gen("thought", max_tokens=12, temperature=0.8, stop="\n")
    forks.join()
    for i, thought in enumerate(s["thought"]):
        s += f"Approach {i + 1}:{thought}\n"
    s += "The best approach is number " + sgl.select("best", ["1", "2", "3"]) + "."


def main(backend):
    state = tree_of_thought.run(question="How can I get better at chess?", backend=backend)
    for i, t in enumerate(state["thought"], 1):
        print(f"{i}. {t.strip()}")
    print("best:", state["best"])
    return state


if __name__ == "__main__":
    from _common import backend_from_args

    main(backend_from_args(__doc__))

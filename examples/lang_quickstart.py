"""The smallest program: a chat turn with one generation. `python examples/lang_quickstart.py`."""

import arborlm.lang as sgl


@sgl.function
def answer(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=32, temperature=0))


def main(backend):
    state = answer.run(question="What is the capital of France?", backend=backend)
    print(state["answer"])
    return state


if __name__ == "__main__":
    from _common import backend_from_args

    main(backend_from_args(__doc__))

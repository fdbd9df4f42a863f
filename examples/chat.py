"""Multi-turn chat: each turn sees the earlier ones, rendered with the model's chat template, and
reuses their KV from the prefix cache. `python examples/chat.py`."""

import arborlm.lang as sgl


@sgl.function
def conversation(s, turns):
    s += sgl.system("You are a helpful, brief assistant.")
    for i, turn in enumerate(turns):
        s += sgl.user(turn)
        s += sgl.assistant(sgl.gen(f"reply{i}", max_tokens=24, temperature=0))


def main(backend):
    turns = ["Name a fruit that is yellow.", "What colour is it inside?"]
    state = conversation.run(turns=turns, backend=backend)
    for m in state.messages():
        print(f"{m['role']:>9}: {m['content'].strip()}")
    return state


if __name__ == "__main__":
    from _common import backend_from_args

    main(backend_from_args(__doc__))

"""A small ReAct loop: the model picks a tool with select, writes its input with gen, and the
program runs the tool and appends the observation. `python examples/react_tools.py`."""

import arborlm.lang as sgl

TOOLS = {
    "calculator": lambda x: str(eval(x, {"__builtins__": {}}, {})) if set(x) <= set("0123456789+-*/(). ") else "error",
    "lookup": lambda x: {"france": "Paris", "italy": "Rome", "japan": "Tokyo"}.get(x.strip().lower(), "unknown"),
}
INTRO = ("Answer the question using tools. Tools: calculator (arithmetic), lookup (capital of a country).\n"
         "Question: What is 12 * 7?\nAction: calculator\nInput: 12 * 7\nObservation: 84\nAction: finish\n"
         "Answer: 84\n\n")


@sgl.function
def react(s, question, max_steps=3):
    s += INTRO + "Question: " + question + "\n"
    for _ in range(max_steps):
        s += "Action: " + sgl.select("action", ["calculator", "lookup", "finish"]) + "\n"
        if s["action"] == "finish":
            break
        s += "Input: " + sgl.gen("input", max_tokens=12, stop="\n", temperature=0) + "\n"
        s += "Observation: " + TOOLS[s["action"]](s["input"]) + "\n"
    s += "Answer: " + sgl.gen("answer", max_tokens=12, stop="\n", temperature=0)


def main(backend):
    state = react.run(question="What is the capital of Japan?", backend=backend)
    print(state.text()[len(INTRO):])
    return state


if __name__ == "__main__":
    from _common import backend_from_args

    main(backend_from_args(__doc__))

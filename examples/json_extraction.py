"""Extract structured data into a pydantic model with a JSON-schema-constrained gen (needs the
runtime's json_schema support). `python examples/json_extraction.py`."""

from pydantic import BaseModel

import arborlm.lang as sgl


class Person(BaseModel):
    name: str
    age: int
    city: str


@sgl.function
def extract(s, text):
    s += sgl.user("Extract the person's name, age and city as JSON.\n\n" + text)
    s += sgl.assistant(sgl.gen("person", json_schema=Person, max_tokens=48, temperature=0))


def main(backend):
    state = extract.run(text="Maria Lopez, 34, moved to Lisbon last spring.", backend=backend)
    person = state.get_var("person", parsed=True)
    print(repr(person))
    return state


if __name__ == "__main__":
    from _common import backend_from_args

    main(backend_from_args(__doc__))

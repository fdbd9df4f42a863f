"""The output processor alone: what a sampled token does to its request, with no scheduler or model."""

from arborlm.runtime.detokenizer import IncrementalDetokenizer
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.scheduler.output_processor import OutputProcessor
from arborlm.runtime.scheduler.req import Req
from arborlm.runtime.scheduler.scheduler import SchedulerConfig

EOS = 0


class CharTokenizer:
    """Token i is the letter chr(ord('a') + i - 1); 0 is EOS."""

    def decode(self, ids, **kw):
        return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


def req(**params) -> Req:
    r = Req("r", [1, 2], SamplingParams.from_dict({"max_new_tokens": 8, **params}))
    r.detok = IncrementalDetokenizer(CharTokenizer())
    return r


class Grammar:
    """Accepts tokens up to a limit, terminates after `done` tokens; may force one token."""

    def __init__(self, done: int, allowed=lambda t: True):
        self.n, self.done, self.allowed = 0, done, allowed

    def accept(self, tok):
        if not self.allowed(tok):
            return False
        self.n += 1
        return True

    def is_terminated(self):
        return self.n >= self.done


def test_stop_token_length_and_stop_text():
    out = OutputProcessor(SchedulerConfig(context_length=64, eos_ids={EOS}))
    r = req()
    assert not out.process(r, [3, 4]) and r.detok.text == "cd"
    assert out.process(r, [EOS]) and r.finish_reason == {"type": "stop", "matched": EOS} and r.detok.text == "cd"
    r = req(max_new_tokens=2)
    assert out.process(r, [3, 4, 5]) and r.output_ids == [3, 4]  # nothing past the finish
    assert r.finish_reason == {"type": "length", "length": 2}
    r = req(stop=["de"])
    assert out.process(r, [3, 4, 5, 6]) and r.finish_reason == {"type": "stop", "matched": "de"} and r.detok.text == "c"
    r = req(stop=["de"], no_stop_trim=True)
    assert out.process(r, [4, 5]) and r.detok.text == "de"
    r = req(min_new_tokens=2)
    assert not out.process(r, [EOS]) and out.process(r, [EOS])  # EOS counts only from min_new_tokens on


def test_grammar_termination_violation_and_jump_forward():
    jumped = []

    def jump(r):  # forces one more token, as JumpForward appends the grammar's forced string
        jumped.append(r.rid)
        r.output_ids.append(9)
        r.grammar.accept(9)
        return 1

    out = OutputProcessor(SchedulerConfig(context_length=64, eos_ids={EOS}, jump_forward=jump))
    r = req()
    r.grammar = Grammar(done=4)
    assert not out.process(r, [3]) and r.output_ids == [3, 9]
    assert out.process(r, [3]) and r.finish_reason == {"type": "stop", "matched": None} and len(jumped) == 2
    r = req()
    r.grammar = Grammar(done=9, allowed=lambda t: t != 7)
    assert out.process(r, [7]) and r.finish_reason["type"] == "abort"

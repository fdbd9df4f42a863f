"""Stop strings and stop regexes over the output text (no model): where a stop matches, and how much
of a running request's text a stream may show."""

import pytest

from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.scheduler.stop_text import find_stop, stream_safe_len


def P(**kw):
    return SamplingParams.from_dict(kw)


def test_stop_string_found_in_the_new_tail_only():
    p = P(stop=["END", "\n\n"])
    assert find_stop("abc EN", p, 2) is None
    assert find_stop("abc ENDx", p, 3) == (4, "END")
    assert find_stop("a\n\nb", p, 1) == (1, "\n\n")


def test_stop_regex_is_searched_in_the_whole_text():
    p = P(stop_regex=r"\d+\.")
    assert find_stop("abc 12", p, 1) is None
    assert find_stop("abc 12.", p, 1) == (4, "12.")
    # the earliest of several stops wins
    p = P(stop=["zz"], stop_regex=[r"x+y"])
    assert find_stop("..xxy..zz", p, 9) == (2, "xxy")


def test_an_empty_regex_match_is_no_stop():
    assert find_stop("abc", P(stop_regex="q*"), 3) is None


def test_stream_holds_back_a_possible_start_of_a_stop():
    p = P(stop=["END"])
    assert stream_safe_len("abc EN", p) == 4
    assert stream_safe_len("abc E", p) == 4
    assert stream_safe_len("abc X", p) == 5
    p = P(stop_regex=r"\d+\.")
    assert stream_safe_len("total 12", p) == 6  # "12" may become "12."
    assert stream_safe_len("total ab", p) == 8
    p = P(stop_regex=r"<tool>.*</tool>")
    assert stream_safe_len("say <to", p) == 4
    assert stream_safe_len("say <tool>{x", p) == 4


def test_sglang_request_vocabulary():
    p = P(stop_regex="a+", sampling_seed=7, logit_bias={"5": 1.5, 6: -2}, custom_params={"k": 1},
          stream_interval=4, no_stop_trim=True, structural_tag=None, json_schema=None)
    assert p.stop_regex == ["a+"] and p.seed == 7 and p.logit_bias == {5: 1.5, 6: -2.0}
    assert p.needs_penalty
    with pytest.raises(BadRequestError, match="structural_tag: must be an object with `format`"):
        P(structural_tag='{"x": 1}')
    assert P(structural_tag={"type": "structural_tag", "structures": [], "triggers": []}).constrained
    with pytest.raises(BadRequestError, match="beam_width: not supported"):
        P(beam_width=4)
    with pytest.raises(BadRequestError, match="watermark: not supported"):
        P(watermark={"enabled": True, "key": 1})
    P(beam_width=1, watermark={"enabled": False}, structural_tag="")  # asking for nothing is fine
    with pytest.raises(BadRequestError, match="stop_regex"):
        P(stop_regex="(")
    with pytest.raises(BadRequestError, match="disagree"):
        P(seed=1, sampling_seed=2)
    with pytest.raises(BadRequestError, match="logit_bias"):
        P(logit_bias={"a": 1})
    with pytest.raises(BadRequestError, match="logit_bias"):
        P(logit_bias={"1": 101})
    with pytest.raises(BadRequestError, match="tempurature: unknown"):
        P(tempurature=1)
    with pytest.raises(BadRequestError, match="outside the vocabulary"):
        P(logit_bias={"100": 1}).check_vocab(100)

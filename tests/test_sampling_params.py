import pytest

from arborlm.runtime.sampling.params import SamplingParams


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_p", 0),
        ("top_p", 1.5),
        ("max_new_tokens", -1),
        ("max_new_tokens", 2.5),
        ("min_new_tokens", -1),
        ("temperature", -0.1),
        ("top_k", 0),
        ("top_k", -5),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("frequency_penalty", 3),
        ("presence_penalty", -3),
        ("n", 0),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", "abc"),
        ("seed", "x"),
        ("ignore_eos", "yes"),
        ("temperature", "hot"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict({field: value})


def test_min_new_tokens_above_max_is_rejected():
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams.from_dict({"min_new_tokens": 10, "max_new_tokens": 5})


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams.from_dict({"max_tokens": 5})


def test_structured_fields():
    assert SamplingParams.from_dict({"regex": "a+"}).constrained
    assert SamplingParams.from_dict({"json_schema": {"type": "integer"}}).json_schema == '{"type": "integer"}'
    assert not SamplingParams.from_dict({}).constrained
    with pytest.raises(ValueError, match="regex and sampling_params.json_schema"):
        SamplingParams.from_dict({"regex": "a+", "json_schema": "{}"})
    with pytest.raises(ValueError, match="json_schema: not valid JSON"):
        SamplingParams.from_dict({"json_schema": "{not json"})
    with pytest.raises(ValueError, match="ebnf: must be a non-empty string"):
        SamplingParams.from_dict({"ebnf": ""})


def test_defaults_nulls_and_stop_forms():
    p = SamplingParams.from_dict({"temperature": None, "stop": "END"})
    assert p.temperature == 1.0 and p.stop == ["END"] and p.max_new_tokens == 128
    assert SamplingParams.from_dict({"stop": ""}).stop == []
    assert SamplingParams.from_dict({"stop": []}).stop == []
    assert SamplingParams.from_dict(None).greedy is False
    assert SamplingParams.from_dict({"temperature": 0}).greedy

"""The two real-model backends the lang tests run against: the in-process Engine and a live server."""

import pytest

from conftest import API_KEY

BACKENDS = ["engine", "endpoint"]


def make_backend(kind: str, request):
    from arborlm.lang.backend import as_backend
    from arborlm.lang.backend.runtime_endpoint import RuntimeEndpoint

    if kind == "engine":
        return as_backend(request.getfixturevalue("engine"))
    return RuntimeEndpoint(request.getfixturevalue("server").url, api_key=API_KEY)


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request):
    return make_backend(request.param, request)

"""The `openai` provider against a stub server (failure modes) and a real llama.cpp server (integration)."""


import pytest

from relaytune.errors import RelaytuneError
from relaytune.generation import Decoding, make_generator
from relaytune.params import ModelParams, ProviderParams
from tests.stub_server import StubServer, completion_body


@pytest.fixture
def stub(request):
    server = StubServer(request.param)
    yield server
    server.close()


def _gen(tmp_path, base_url, **overrides):
    p = ProviderParams(provider="openai", model="stub", base_url=base_url, max_retries=3, timeout_s=5,
                       **overrides)
    return make_generator(p, ModelParams(), "judge", tmp_path / "cache")


MESSAGES = [[{"role": "user", "content": "hi"}]]
ERROR_BODY = {"error": {"message": "slow down", "type": "rate_limit"}}


@pytest.mark.parametrize("stub", [[(429, ERROR_BODY), (503, ERROR_BODY), (200, completion_body())]], indirect=True)
def test_rate_limits_and_5xx_are_retried(tmp_path, stub):
    out = _gen(tmp_path, stub.base_url).generate(MESSAGES, Decoding(8))
    assert out[0].text == "Hello there." and out[0].completion_tokens == 2
    assert len(stub.requests) == 3


@pytest.mark.parametrize("stub", [[(200, completion_body())]], indirect=True)
def test_provenance_says_what_answered_and_when_the_endpoint_was_never_asked(tmp_path, stub):
    first = _gen(tmp_path, stub.base_url)
    first.generate(MESSAGES, Decoding(8))
    assert first.provenance()["this_run"] == {"requests": 1, "served_from_cache": 0, "generated_this_run": 1,
                                              "endpoint_reached": True, "statuses": {"ok": 1}}
    stub.close()  # the endpoint goes down; the cache still answers, and the record says so
    again = _gen(tmp_path, stub.base_url)
    again.generate(MESSAGES, Decoding(8))
    assert again.provenance()["this_run"]["served_from_cache"] == 1
    assert again.provenance()["this_run"]["endpoint_reached"] is False


@pytest.mark.parametrize("stub", [[(500, ERROR_BODY)]], indirect=True)
def test_an_endpoint_that_stays_down_is_one_clear_error(tmp_path, stub):
    with pytest.raises(RelaytuneError) as e:
        _gen(tmp_path, stub.base_url).generate(MESSAGES, Decoding(8))
    assert f"judge: {stub.base_url} failed after 3 retries (InternalServerError)" in str(e.value)
    assert len(stub.requests) == 4


@pytest.mark.parametrize("stub", [[(200, completion_body(choices=False)), (200, completion_body(content=""))]],
                         indirect=True)
def test_malformed_and_empty_completions_are_recorded(tmp_path, stub):
    gen = _gen(tmp_path, stub.base_url, batch_size=1)
    out = gen.generate(MESSAGES + [[{"role": "user", "content": "again"}]], Decoding(8))
    assert sorted(c.status for c in out) == ["empty", "malformed"]


@pytest.mark.parametrize("stub", [[(400, {"error": {"message": "prompt too long"}})]], indirect=True)
def test_a_rejected_request_fails_its_row_only(tmp_path, stub):
    out = _gen(tmp_path, stub.base_url).generate(MESSAGES, Decoding(8))
    assert out[0].status == "error" and "HTTP 400" in out[0].error


@pytest.mark.parametrize("stub", [[(200, completion_body())]], indirect=True)
def test_the_key_comes_only_from_the_named_variable(tmp_path, stub, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-be-used")
    monkeypatch.setenv("RT_TEST_KEY", "secret-from-env")
    _gen(tmp_path, stub.base_url, api_key_env="RT_TEST_KEY").generate(MESSAGES, Decoding(8))
    _gen(tmp_path / "2", stub.base_url).generate(MESSAGES, Decoding(8))
    assert stub.auth_headers == ["Bearer secret-from-env", "Bearer no-key"]
    cached = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert "secret-from-env" not in cached
    monkeypatch.delenv("RT_TEST_KEY")
    with pytest.raises(RelaytuneError, match="judge.api_key_env: environment variable RT_TEST_KEY is not set"):
        _gen(tmp_path, stub.base_url, api_key_env="RT_TEST_KEY")


@pytest.mark.slow  # starts llama.cpp's server
def test_real_llama_cpp_server_generates_and_caches(tmp_path, llama_server):
    gen = _gen(tmp_path, llama_server, batch_size=2, max_new_tokens=24)
    requests = [[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                [{"role": "user", "content": "Name a colour of the sky."}]]
    first = gen.generate(requests, Decoding(24))
    assert all(c.status == "ok" and c.text for c in first)
    assert all(c.completion_tokens > 0 for c in first)
    assert gen.stats.tokens_per_second and gen.stats.tokens_per_second > 0
    again = _gen(tmp_path, llama_server).generate(requests, Decoding(24))
    assert [c.text for c in again] == [c.text for c in first] and all(c.cached for c in again)


def test_eval_answers_from_a_server_that_serves_base_and_adapter(tmp_path, monkeypatch):
    from relaytune.evaluate import HeldoutItem, generate_answers
    from relaytune.params import Params

    server = StubServer(lambda body: (200, completion_body(f"answer of {body['model']}")))
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("RELAYTUNE_CACHE", str(tmp_path / "cache"))
        epoch = tmp_path / "models" / "epoch3"
        epoch.mkdir(parents=True)
        (epoch / "manifest.json").write_text("{}")
        (epoch / "adapter_model.safetensors").write_bytes(b"adapter one")
        params = Params.model_validate({"eval": {"server": {"base_url": server.base_url, "base_model": "base",
                                                            "tuned_model": "tuned", "max_retries": 0}}})
        items = [HeldoutItem(f"q{i}", "adm-fee", "admissions", True, f"question {i}?", "ref") for i in range(3)]
        tuned = generate_answers(items, params, "tuned")
        base = generate_answers(items, params, "base")
        assert [c.text for c in tuned.completions] == ["answer of tuned"] * 3
        assert [c.text for c in base.completions] == ["answer of base"] * 3
        assert tuned.model_info["adapter_hash"].startswith("sha256:") and len(server.requests) == 6
        generate_answers(items, params, "tuned")
        assert len(server.requests) == 6  # cached
        (epoch / "adapter_model.safetensors").write_bytes(b"adapter two")  # the server now serves another adapter
        generate_answers(items, params, "tuned")
        assert len(server.requests) == 9  # same served name, new adapter: asked again
    finally:
        server.close()

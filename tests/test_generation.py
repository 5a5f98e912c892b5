from relaytune.generation import Completion, Decoding, GenerationCache, TextGenerator


class CountingBackend:
    provider = "fake"
    model_id = "fake-model"

    def __init__(self, statuses=None):
        self.calls: list[int] = []
        self.statuses = statuses or {}

    def complete(self, batch, decoding):
        self.calls.append(len(batch))
        out = []
        for messages in batch:
            q = messages[-1]["content"]
            status = self.statuses.get(q, "ok")
            out.append(Completion(text="" if status != "ok" else f"answer to {q}", status=status,
                                  completion_tokens=3 if status == "ok" else 0))
        return out


def _requests(n):
    return [[{"role": "user", "content": f"q{i}"}] for i in range(n)]


def _generator(tmp_path, backend, batch_size=2):
    return TextGenerator(lambda: backend, "fake", backend.model_id, GenerationCache(tmp_path / "cache"), batch_size,
                         {"provider": "fake"})


def test_cache_means_a_rerun_never_pays_twice(tmp_path):
    backend = CountingBackend()
    first = _generator(tmp_path, backend).generate(_requests(5), Decoding(16))
    assert backend.calls == [2, 2, 1]
    assert [c.text for c in first] == [f"answer to q{i}" for i in range(5)]

    rerun = _generator(tmp_path, backend)
    again = rerun.generate(_requests(6), Decoding(16))
    assert backend.calls == [2, 2, 1, 1]  # only the new request
    assert [c.text for c in again[:5]] == [c.text for c in first] and all(c.cached for c in again[:5])
    assert rerun.stats.cache_hits == 5 and rerun.stats.generated_tokens == 3


def test_decoding_and_messages_are_part_of_the_key(tmp_path):
    backend = CountingBackend()
    gen = _generator(tmp_path, backend)
    gen.generate(_requests(2), Decoding(16))
    gen.generate(_requests(2), Decoding(16, temperature=0.7, seed=1))
    gen.generate(_requests(2), Decoding(32))
    assert sum(backend.calls) == 6
    gen.generate(_requests(2), Decoding(16, seed=99))  # greedy: the seed changes nothing
    assert sum(backend.calls) == 6
    assert GenerationCache.key("a", "m", _requests(1)[0], Decoding(16)) != GenerationCache.key(
        "b", "m", _requests(1)[0], Decoding(16))


def test_failures_are_recorded_and_not_cached(tmp_path):
    backend = CountingBackend(statuses={"q0": "malformed", "q1": "empty", "q2": "error"})
    gen = _generator(tmp_path, backend, batch_size=8)
    out = gen.generate(_requests(4), Decoding(16))
    assert [c.status for c in out] == ["malformed", "empty", "error", "ok"]
    assert gen.stats.statuses == {"malformed": 1, "empty": 1, "error": 1, "ok": 1}
    gen.generate(_requests(4), Decoding(16))
    assert backend.calls == [4, 2]  # the malformed and the errored row are asked again; empty is a real answer

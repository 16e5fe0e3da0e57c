"""The teacher client against a real chat-completions server on 127.0.0.1 (http.server in a thread,
ephemeral port). The server plays a script of responses and records, server-side, how many
requests it saw and the most it had in flight at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from instructrec.engine.errors import InputError
from instructrec.training.annotation import ItemView
from instructrec.training.annotation.teacher import (
    ChatCompletionsClient,
    TeacherAnnotator,
    TeacherBatchError,
    TeacherConfig,
    TeacherRequestError,
    TeacherRetriesExhausted,
)

from instructrec_test_instruction_fixtures import ScriptedChatServer  # registered by conftest.py


def make_client(server, tmp_path=None, **overrides) -> ChatCompletionsClient:
    settings = dict(base_url=server.base_url, model="tiny-teacher", api_key="k", timeout_s=2.0,
                    max_retries=3, backoff_base_s=0.001, backoff_max_s=0.01, max_concurrency=4,
                    cache_dir=(tmp_path / "cache") if tmp_path is not None else None)
    settings.update(overrides)
    return ChatCompletionsClient(TeacherConfig(**settings))


def hello(text="hello"):
    return [{"role": "user", "content": text}]


def test_success_returns_content_and_sends_protocol_fields():
    with ScriptedChatServer() as server:
        client = make_client(server)
        assert client.complete(hello("what do I like?")) == "Answer to: what do I like?"
    assert server.requests == 1
    sent = server.bodies[0]
    assert sent["model"] == "tiny-teacher"
    assert sent["messages"] == hello("what do I like?")
    assert sent["temperature"] == 0.0 and sent["max_tokens"] == 96


def test_429_with_retry_after_is_honoured_then_succeeds():
    with ScriptedChatServer([("429", "0.3")]) as server:
        client = make_client(server)
        started = time.monotonic()
        assert client.complete(hello()) == "Answer to: hello"
    assert server.requests == 2
    # Backoff alone is <= 10 ms here; the 0.3 s gap can only come from Retry-After.
    assert server.request_times[1] - server.request_times[0] >= 0.29
    assert time.monotonic() - started >= 0.29
    assert client.stats.retries == 1


def test_500_then_success():
    with ScriptedChatServer(["500", "500"]) as server:
        client = make_client(server)
        assert client.complete(hello()) == "Answer to: hello"
    assert server.requests == 3


def test_response_slower_than_timeout_is_retried():
    with ScriptedChatServer([("slow", 1.0)]) as server:
        client = make_client(server, timeout_s=0.3)
        started = time.monotonic()
        assert client.complete(hello()) == "Answer to: hello"
        elapsed = time.monotonic() - started
    assert server.requests == 2
    assert 0.3 <= elapsed < 1.0  # gave up on the slow answer instead of waiting for it


@pytest.mark.parametrize("bad", ["malformed", "no_content"])
def test_malformed_body_is_retried_then_succeeds(bad):
    with ScriptedChatServer([bad]) as server:
        client = make_client(server)
        assert client.complete(hello()) == "Answer to: hello"
    assert server.requests == 2


def test_malformed_every_time_reports_typed_error():
    with ScriptedChatServer(["malformed"] * 10) as server:
        client = make_client(server, max_retries=2)
        with pytest.raises(TeacherRetriesExhausted) as caught:
            client.complete(hello())
    assert server.requests == 3
    assert caught.value.attempts == 3
    assert "malformed" in caught.value.last_problem


def test_exhausted_retries_raise_typed_error():
    with ScriptedChatServer(["500"] * 10) as server:
        client = make_client(server, max_retries=3)
        with pytest.raises(TeacherRetriesExhausted) as caught:
            client.complete(hello())
    assert server.requests == 4
    assert "HTTP 500" in caught.value.last_problem
    assert "INSTRUCTREC_TEACHER_MAX_RETRIES" in str(caught.value)


def test_client_error_is_not_retried():
    with ScriptedChatServer(["400"]) as server:
        client = make_client(server)
        with pytest.raises(TeacherRequestError) as caught:
            client.complete(hello())
    assert server.requests == 1 and caught.value.status == 400


def test_cache_hit_makes_no_request_and_survives_a_new_client(tmp_path):
    with ScriptedChatServer() as server:
        first = make_client(server, tmp_path)
        answer = first.complete(hello("cached?"))
        assert server.requests == 1
        assert first.complete(hello("cached?")) == answer
        assert server.requests == 1
        # A new process (a rerun) reads the same files: still no request.
        rerun = make_client(server, tmp_path)
        assert rerun.complete(hello("cached?")) == answer
        assert server.requests == 1 and rerun.stats.cache_hits == 1
        # Another model is another key.
        other = make_client(server, tmp_path, model="other-model")
        other.complete(hello("cached?"))
        assert server.requests == 2
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_concurrency_is_bounded_and_batch_resumes(tmp_path):
    prompts = [hello(f"prompt {i}") for i in range(12)]
    with ScriptedChatServer([("hold", 0.1)] * 12) as server:
        client = make_client(server, tmp_path, max_concurrency=3)
        answers = client.complete_many(prompts + prompts[:2])  # duplicates are sent once
        assert answers[:12] == [f"Answer to: prompt {i}" for i in range(12)]
        assert answers[12:] == answers[:2]
        assert server.requests == 12
        assert server.max_in_flight == 3
        again = make_client(server, tmp_path, max_concurrency=3).complete_many(prompts)
        assert again == answers[:12] and server.requests == 12


def test_batch_reports_failures_after_caching_the_rest(tmp_path):
    with ScriptedChatServer(["400"]) as server:
        client = make_client(server, tmp_path, max_concurrency=1)
        with pytest.raises(TeacherBatchError) as caught:
            client.complete_many([hello("a"), hello("b"), hello("c")])
        assert len(caught.value.failures) == 1
        assert server.requests == 3
        # The rerun pays only for the one that failed.
        assert len(client.complete_many([hello("a"), hello("b"), hello("c")])) == 3
        assert server.requests == 4


def test_annotator_prompts_carry_history_and_review():
    history = [ItemView("a", "Space Racer", ("Video Games", "Racing"), review="Fast and fun with friends."),
               ItemView("b", "Zombie Night", ("Video Games", "Horror"))]
    target = ItemView("c", "Gaming Mouse", ("Video Games", "PC", "Accessories", "Gaming Mice"))
    with ScriptedChatServer() as server:
        annotator = TeacherAnnotator(client=make_client(server), progress=False)
        assert annotator.name == "teacher:tiny-teacher"
        preference = annotator.explicit_preferences([history])[0]
        intention = annotator.vague_intentions([(target, "Bought it for my son's birthday.")])[0]
        assert annotator.specific_intention(target) == "Video Games, PC, Accessories, Gaming Mice"
    assert preference.startswith("Answer to:") and intention.startswith("Answer to:")
    preference_prompt = server.bodies[0]["messages"][-1]["content"]
    assert "Space Racer" in preference_prompt and "Fast and fun with friends." in preference_prompt
    intention_prompt = server.bodies[1]["messages"][-1]["content"]
    assert "Bought it for my son's birthday." in intention_prompt


def test_config_from_env_names_missing_variable():
    with pytest.raises(InputError) as caught:
        TeacherConfig.from_env({"INSTRUCTREC_TEACHER_MODEL": "m"})
    assert caught.value.field == "INSTRUCTREC_TEACHER_BASE_URL"
    with pytest.raises(InputError) as caught:
        TeacherConfig.from_env({"INSTRUCTREC_TEACHER_BASE_URL": "http://127.0.0.1:1/v1"})
    assert caught.value.field == "INSTRUCTREC_TEACHER_MODEL"
    with pytest.raises(InputError) as caught:
        TeacherConfig.from_env({"INSTRUCTREC_TEACHER_BASE_URL": "http://h/v1", "INSTRUCTREC_TEACHER_MODEL": "m",
                                "INSTRUCTREC_TEACHER_CONCURRENCY": "many"})
    assert caught.value.field == "INSTRUCTREC_TEACHER_CONCURRENCY"
    config = TeacherConfig.from_env({"INSTRUCTREC_TEACHER_BASE_URL": "http://h:8000/v1/", "INSTRUCTREC_TEACHER_MODEL": "m",
                                     "INSTRUCTREC_TEACHER_CONCURRENCY": "2"})
    assert config.endpoint == "http://h:8000/v1/chat/completions"
    assert config.max_concurrency == 2 and config.api_key is None

"""The teacher client against a real chat-completions server on 127.0.0.1 (http.server in a thread,
ephemeral port). The server plays a script of responses and records, server-side, how many
requests it saw and the most it had in flight at once. Waits between attempts go through the
client's injectable clock (recorded, never slept); one test, the request deadline, runs on real
time against a server that trickles its answer."""

from __future__ import annotations

import email.utils
import random
import socket

import pytest

from instructrec.engine.errors import InputError
from instructrec.training.annotation import ItemView
from instructrec.training.annotation.teacher import (
    ChatCompletionsClient,
    TeacherAnnotator,
    TeacherBatchError,
    TeacherConfig,
    TeacherEmptyAnswer,
    TeacherRequestError,
    TeacherRetriesExhausted,
    TeacherUnavailable,
)

from instructrec_test_instruction_fixtures import ScriptedChatServer  # registered by conftest.py


class FakeClock:
    """The client's clock: `sleep` records the wait and moves time on instead of waiting."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def time(self) -> float:
        return self.now


def make_client(server, tmp_path=None, clock=None, rng=None, **overrides) -> ChatCompletionsClient:
    settings = dict(base_url=server.base_url, model="tiny-teacher", api_key="k", timeout_s=5.0,
                    max_retries=3, backoff_base_s=1.0, backoff_max_s=60.0, max_concurrency=4,
                    cache_dir=(tmp_path / "cache") if tmp_path is not None else None)
    settings.update(overrides)
    clock = clock or FakeClock()
    return ChatCompletionsClient(TeacherConfig(**settings), sleep=clock.sleep, clock=clock.time, rng=rng)


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
    clock = FakeClock()
    with ScriptedChatServer([("429", "0.3"), ("429", "7200")]) as server:
        client = make_client(server, clock=clock, retry_after_max_s=300.0)
        assert client.complete(hello()) == "Answer to: hello"
    assert server.requests == 3
    # The exponential backoff would wait 0.5-1 s, then 1-2 s: these are the server's, the second
    # cut to retry_after_max_s.
    assert clock.sleeps == [0.3, 300.0]
    assert client.stats.retries == 2


def test_retry_after_as_an_http_date_is_read_against_the_clock():
    clock = FakeClock()
    when = email.utils.formatdate(clock.now + 42, usegmt=True)
    with ScriptedChatServer([("429", when)]) as server:
        client = make_client(server, clock=clock)
        assert client.complete(hello()) == "Answer to: hello"
    assert clock.sleeps == [42.0]


def test_500_then_success_backs_off_exponentially_with_jitter():
    clock = FakeClock()
    with ScriptedChatServer(["500", "500", "500"]) as server:
        client = make_client(server, clock=clock, rng=random.Random(7), backoff_base_s=1.0, backoff_max_s=3.0)
        assert client.complete(hello()) == "Answer to: hello"
    assert server.requests == 4
    # Attempt n waits between half and all of min(base * 2**n, max): [0.5, 1], [1, 2], [1.5, 3].
    assert len(clock.sleeps) == 3
    for wait, ceiling in zip(clock.sleeps, (1.0, 2.0, 3.0)):
        assert ceiling / 2 <= wait <= ceiling
    # Seeded jitter: the same seed gives the same waits.
    again = FakeClock()
    with ScriptedChatServer(["500", "500", "500"]) as server:
        make_client(server, clock=again, rng=random.Random(7), backoff_max_s=3.0).complete(hello())
    assert again.sleeps == clock.sleeps


def test_the_timeout_bounds_the_whole_request_not_each_read():
    """The one test on real time: the server sends a valid answer one byte every 0.1 s (51 bytes,
    5 s), so every read gets a byte well within the 0.5 s timeout; the request must still end at
    0.5 s, the client closing the connection while the server still had most of it to send."""
    with ScriptedChatServer([("trickle", 0.1)]) as server:
        client = make_client(server, timeout_s=0.5, max_retries=0)
        with pytest.raises(TeacherRetriesExhausted) as caught:
            client.complete(hello())
        assert server.trickle_done.wait(10)
    assert caught.value.last_problem == "no answer within 0.5s"
    [(sent, total)] = server.trickled
    assert total == 51 and sent < total / 2


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


@pytest.mark.parametrize("empty", ["empty", "blank"])
def test_an_empty_completion_is_retried_once_at_most(empty):
    with ScriptedChatServer([empty]) as server:
        assert make_client(server).complete(hello()) == "Answer to: hello"
    assert server.requests == 2
    clock = FakeClock()
    with ScriptedChatServer([empty] * 10) as server:
        client = make_client(server, clock=clock, max_retries=5)
        with pytest.raises(TeacherEmptyAnswer, match="empty completion twice"):
            client.complete(hello())
    assert server.requests == 2 and clock.sleeps == []  # the server answered: no backoff


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


def test_a_dead_endpoint_stops_a_batch_after_a_streak_of_failed_prompts(tmp_path):
    prompts = [hello(f"prompt {i}") for i in range(10)]
    with ScriptedChatServer(["500"] * 100) as server:
        client = make_client(server, tmp_path, max_retries=1, max_concurrency=1, max_failure_streak=3)
        with pytest.raises(TeacherUnavailable) as caught:
            client.complete_many(prompts)
    # 3 prompts x 2 attempts, then nothing more was sent.
    assert server.requests == 6
    assert caught.value.streak == 3 and caught.value.not_sent == 7
    message = str(caught.value)
    assert "failed 3 prompts in a row" in message and "7 of 10 prompts not sent" in message
    assert "INSTRUCTREC_TEACHER_BASE_URL" in message and "HTTP 500" in message

    # Nothing listens on a closed port: refused connections are a streak too.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ChatCompletionsClient(TeacherConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0,
                                                 max_concurrency=2, max_failure_streak=4),
                                   sleep=FakeClock().sleep)
    with pytest.raises(TeacherUnavailable, match="connection failed") as caught:
        client.complete_many([hello(f"p{i}") for i in range(50)])
    assert client.stats.requests <= 4 + 2  # the streak, and at most one request per thread in flight


def test_an_answer_between_failures_resets_the_streak_and_cache_hits_do_not(tmp_path):
    with ScriptedChatServer(["500", "ok", "500", "ok", "500"]) as server:
        client = make_client(server, tmp_path, max_retries=0, max_concurrency=1, max_failure_streak=2)
        with pytest.raises(TeacherBatchError) as caught:
            client.complete_many([hello(f"p{i}") for i in range(5)])
    assert len(caught.value.failures) == 3 and server.requests == 5
    # Rerun against a dead server: the 2 cached answers come between the failures, yet the batch
    # stops at the streak instead of spending every prompt's retries.
    with ScriptedChatServer(["500"] * 100) as server:
        client = make_client(server, tmp_path, max_retries=0, max_concurrency=1, max_failure_streak=2)
        with pytest.raises(TeacherUnavailable):
            client.complete_many([hello(f"p{i}") for i in range(5)] + [hello(f"q{i}") for i in range(5)])
    assert server.requests == 2


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
    assert config.max_concurrency == 2 and config.api_key is None and config.max_failure_streak == 16
    for url in ("http://h:port/v1", "http:///v1"):
        with pytest.raises(InputError) as caught:
            TeacherConfig.from_env({"INSTRUCTREC_TEACHER_BASE_URL": url, "INSTRUCTREC_TEACHER_MODEL": "m"})
        assert caught.value.field == "INSTRUCTREC_TEACHER_BASE_URL"
    config = TeacherConfig.from_env({"INSTRUCTREC_TEACHER_BASE_URL": "http://h/v1", "INSTRUCTREC_TEACHER_MODEL": "m",
                                     "INSTRUCTREC_TEACHER_MAX_FAILURE_STREAK": "3"})
    assert config.max_failure_streak == 3


def run_build(tmp_path, capsys, *extra):
    from instructrec.cli import main

    from instructrec_test_instruction_fixtures import write_prepared

    data = write_prepared(tmp_path / "prepared")
    code = main(["instructions", "build", "--data", str(data), "--out", str(tmp_path / "out"),
                 "--annotator", "teacher", *extra])
    return code, capsys.readouterr().err


def test_build_cli_teacher_progress_bar_follows_no_progress(tmp_path, capsys, monkeypatch):
    with ScriptedChatServer() as server:
        monkeypatch.setenv("INSTRUCTREC_TEACHER_BASE_URL", server.base_url)
        monkeypatch.setenv("INSTRUCTREC_TEACHER_MODEL", "tiny-teacher")
        code, err = run_build(tmp_path / "quiet", capsys, "--no-progress")
        assert code == 0 and server.requests > 1
        assert "teacher P2" not in err and "teacher I1" not in err and "prompt/s" not in err
        code, err = run_build(tmp_path / "bars", capsys)
        assert code == 0 and "teacher P2" in err


def errors_logged(caplog) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    caplog.clear()
    return messages


def test_build_cli_teacher_setup_and_failures_are_one_line_exit_2(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.delenv("INSTRUCTREC_TEACHER_BASE_URL", raising=False)
    monkeypatch.setenv("INSTRUCTREC_TEACHER_MODEL", "tiny-teacher")
    code, err = run_build(tmp_path / "unset", capsys, "--no-progress")
    assert code == 2 and "Traceback" not in err
    [line] = errors_logged(caplog)
    assert "INSTRUCTREC_TEACHER_BASE_URL: is not set" in line and "--annotator offline" in line

    with ScriptedChatServer(["500"] * 100) as server:
        monkeypatch.setenv("INSTRUCTREC_TEACHER_BASE_URL", server.base_url)
        monkeypatch.setenv("INSTRUCTREC_TEACHER_MAX_RETRIES", "0")
        monkeypatch.setenv("INSTRUCTREC_TEACHER_MAX_FAILURE_STREAK", "2")
        monkeypatch.setenv("INSTRUCTREC_TEACHER_CONCURRENCY", "1")
        code, err = run_build(tmp_path / "dead", capsys, "--no-progress")
    assert code == 2 and "Traceback" not in err and server.requests == 2
    [line] = errors_logged(caplog)
    assert "failed 2 prompts in a row" in line and "\n" not in line

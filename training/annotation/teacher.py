"""Teacher annotator: P2 and I1 written by an LLM behind any OpenAI-compatible chat-completions
endpoint (OpenAI, vLLM, llama.cpp server, Ollama's /v1, ...).

Configuration comes from the environment (see `TeacherConfig.from_env`). The client uses only the
standard library, runs a bounded number of requests at once, retries transient failures with
exponential backoff and jitter (honouring Retry-After), and keeps an on-disk cache with one small
JSON file per answer, keyed by sha256(model, messages, sampling params) and written atomically,
so a rerun pays nothing twice and an interrupted run resumes where it stopped.

Error policy (decided here, relied on by the builder):
- `timeout_s` bounds a whole request (connect, headers and body), not each socket read: a server
  that trickles a byte at a time is cut off at the deadline.
- 429, 408, 409 and 5xx responses, timeouts and connection failures are transient: retried.
- A 200 response whose body is not JSON, or has no `choices[0].message.content` string, is also
  retried: proxies and overloaded servers do return truncated or HTML bodies, and a second try
  usually succeeds. After the last attempt it is reported as `TeacherRetriesExhausted` with
  `last_problem` saying the body was malformed.
- Any other 4xx (bad request, bad key, unknown model) is not retried: `TeacherRequestError` at once,
  since repeating the same request cannot fix it.
- An empty or whitespace-only answer is retried once, without waiting; a second one is
  `TeacherEmptyAnswer` (at temperature 0 the model answers the same prompt the same way).
- A batch stops early with `TeacherUnavailable` after `max_failure_streak` prompts in a row failed
  (each after its own retries): a dead endpoint or a wrong URL is reported in about a minute
  instead of after every prompt has spent its retries.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from instructrec.engine.errors import InputError, InstructRecError

from .base import Annotator, ItemView, clean_category_labels

log = logging.getLogger(__name__)

ENV_BASE_URL = "INSTRUCTREC_TEACHER_BASE_URL"
ENV_MODEL = "INSTRUCTREC_TEACHER_MODEL"
ENV_API_KEY = "INSTRUCTREC_TEACHER_API_KEY"
ENV_CONCURRENCY = "INSTRUCTREC_TEACHER_CONCURRENCY"
ENV_TIMEOUT = "INSTRUCTREC_TEACHER_TIMEOUT_S"
ENV_MAX_RETRIES = "INSTRUCTREC_TEACHER_MAX_RETRIES"
ENV_CACHE_DIR = "INSTRUCTREC_TEACHER_CACHE_DIR"
ENV_MAX_FAILURE_STREAK = "INSTRUCTREC_TEACHER_MAX_FAILURE_STREAK"

_RETRIED_STATUSES = frozenset({408, 409, 429})


class TeacherError(InstructRecError):
    """The teacher endpoint could not produce an answer."""


class TeacherRequestError(TeacherError):
    """The endpoint rejected the request (4xx other than 408/409/429); retrying cannot help."""

    def __init__(self, status: int, body: str, url: str):
        self.status = status
        self.body = body
        hint = ""
        if status in (401, 403):
            hint = f" (check {ENV_API_KEY})"
        elif status == 404:
            hint = f" (check {ENV_BASE_URL} ends before /chat/completions, e.g. http://host:8000/v1, and {ENV_MODEL})"
        super().__init__(f"teacher endpoint {url} answered HTTP {status}{hint}: {body[:300]}")


class TeacherRetriesExhausted(TeacherError):
    """Every attempt failed with a transient problem; `last_problem` says what the last one was."""

    def __init__(self, attempts: int, last_problem: str, url: str):
        self.attempts = attempts
        self.last_problem = last_problem
        super().__init__(
            f"teacher endpoint {url} failed {attempts} attempts; last: {last_problem} "
            f"(raise {ENV_MAX_RETRIES} or {ENV_TIMEOUT}, lower {ENV_CONCURRENCY}, or check the server; "
            "answers already received are cached, so a rerun resumes)")


class TeacherEmptyAnswer(TeacherError):
    """The model answered nothing (or only whitespace) twice for the same prompt."""

    def __init__(self, url: str, model: str):
        super().__init__(
            f"teacher endpoint {url} answered an empty completion twice for the same prompt; "
            f"check that {ENV_MODEL}={model!r} is a chat model that answers these prompts")


class TeacherUnavailable(TeacherError):
    """A batch stopped early: this many prompts in a row failed, so the endpoint is down or wrong."""

    def __init__(self, streak: int, last: TeacherError, answered: int, not_sent: int, total: int, url: str):
        self.streak = streak
        self.last = last
        self.not_sent = not_sent
        super().__init__(
            f"teacher endpoint {url} failed {streak} prompts in a row, so the batch stopped early "
            f"({not_sent} of {total} prompts not sent, {answered} answered and cached); last: {last} "
            f"-- check {ENV_BASE_URL} and that the server is up, then rerun: cached answers are not "
            f"asked again ({ENV_MAX_FAILURE_STREAK} sets how many failures in a row stop a batch)")


class TeacherBatchError(TeacherError):
    """Some prompts of a batch failed; the others were answered and cached."""

    def __init__(self, failures: list[tuple[int, TeacherError]], total: int):
        self.failures = failures
        first = failures[0][1]
        super().__init__(f"{len(failures)} of {total} teacher prompts failed; first: {first}")


class _MalformedResponse(Exception):
    pass


class _TransientFailure(Exception):
    def __init__(self, problem: str, retry_after_s: float | None = None):
        super().__init__(problem)
        self.problem = problem
        self.retry_after_s = retry_after_s


class _EmptyAnswer(_TransientFailure):
    def __init__(self):
        super().__init__("the completion was empty")


@dataclass(frozen=True)
class TeacherConfig:
    base_url: str
    model: str
    api_key: str | None = None
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5  # retries after the first attempt
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # A server's Retry-After is obeyed up to this long; beyond it the wait is cut to this cap.
    retry_after_max_s: float = 300.0
    temperature: float = 0.0
    max_tokens: int = 96
    cache_dir: Path | None = None
    # Prompts failing in a row (each after all its retries) that stop a batch. 16 is two waves of
    # the default 8 concurrent requests: with the default backoff (1+2+4+8+16 s between 6
    # attempts) a dead endpoint is reported after about a minute, where 10,000 prompts spending
    # their retries one by one took about 8 hours. A live but overloaded server fails a prompt
    # only when 6 attempts over ~31 s all fail, so 16 in a row with no success means it is down.
    max_failure_streak: int = 16

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "TeacherConfig":
        """Read the endpoint from the environment. Required: INSTRUCTREC_TEACHER_BASE_URL (the
        OpenAI-style base, e.g. https://api.openai.com/v1) and INSTRUCTREC_TEACHER_MODEL.
        Optional: INSTRUCTREC_TEACHER_API_KEY (sent as a Bearer token; local servers often need
        none), INSTRUCTREC_TEACHER_CONCURRENCY (8), INSTRUCTREC_TEACHER_TIMEOUT_S (60),
        INSTRUCTREC_TEACHER_MAX_RETRIES (5), INSTRUCTREC_TEACHER_MAX_FAILURE_STREAK (16),
        INSTRUCTREC_TEACHER_CACHE_DIR (none: the builder puts it under its output directory)."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for name, key in ((ENV_BASE_URL, "base_url"), (ENV_MODEL, "model")):
            value = (env.get(name) or "").strip()
            if not value:
                raise InputError(name, "is not set", f"export {name}=... to use the teacher annotator, "
                                 "or pass --annotator offline")
            values[key] = value
        values["api_key"] = (env.get(ENV_API_KEY) or "").strip() or None
        for name, key, kind in ((ENV_CONCURRENCY, "max_concurrency", int), (ENV_TIMEOUT, "timeout_s", float),
                                (ENV_MAX_RETRIES, "max_retries", int),
                                (ENV_MAX_FAILURE_STREAK, "max_failure_streak", int)):
            raw = (env.get(name) or "").strip()
            if raw:
                try:
                    values[key] = kind(raw)
                except ValueError:
                    raise InputError(name, f"{raw!r} is not a number", f"set {name} to a positive {kind.__name__}") from None
        raw_cache = (env.get(ENV_CACHE_DIR) or "").strip()
        if raw_cache:
            values["cache_dir"] = Path(raw_cache)
        values.update(overrides)
        return cls(**values).validated()

    def validated(self) -> "TeacherConfig":
        if not self.base_url.startswith(("http://", "https://")):
            raise InputError(ENV_BASE_URL, f"{self.base_url!r} is not an http(s) URL", "e.g. http://127.0.0.1:8000/v1")
        try:
            parts = urllib.parse.urlsplit(self.base_url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise InputError(ENV_BASE_URL, f"{self.base_url!r} is not a valid URL ({exc})",
                             "e.g. http://127.0.0.1:8000/v1") from None
        if not parts.hostname:
            raise InputError(ENV_BASE_URL, f"{self.base_url!r} names no host", "e.g. http://127.0.0.1:8000/v1")
        if self.max_concurrency < 1:
            raise InputError(ENV_CONCURRENCY, f"must be >= 1, got {self.max_concurrency}", "use 1 to 64")
        if self.timeout_s <= 0:
            raise InputError(ENV_TIMEOUT, f"must be > 0, got {self.timeout_s}", "seconds, e.g. 60")
        if self.max_retries < 0:
            raise InputError(ENV_MAX_RETRIES, f"must be >= 0, got {self.max_retries}", "e.g. 5")
        if self.max_failure_streak < 1:
            raise InputError(ENV_MAX_FAILURE_STREAK, f"must be >= 1, got {self.max_failure_streak}", "e.g. 16")
        return self

    @property
    def endpoint(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"


class ResponseCache:
    """One JSON file per answer under `root/<first two hex>/<sha256>.json`, written to a temporary
    file and renamed (os.replace is atomic on POSIX and Windows), so a crash mid-write never leaves
    a half entry that a later run would trust."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("ignoring unreadable teacher cache entry %s", path)
            return None
        content = entry.get("content") if isinstance(entry, dict) else None
        return content if isinstance(content, str) else None

    def put(self, key: str, content: str, request: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"request": request, "content": content}, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0


class _RequestDeadline:
    """Bounds a whole request (connect, headers, body) by `seconds`. Socket timeouts bound each
    read only, so a server sending a byte every 0.5 s held a request 12 s under a 2 s timeout. At
    the deadline a timer shuts the connection's socket down, which ends any read blocked on it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:  # the deadline passed while connecting
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def __enter__(self) -> "_RequestDeadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown (an SSL socket's own would drop its TLS state under a reader).
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the reader: nothing left to interrupt


class _WatchedConnection:
    """An http.client connection that hands its socket to a _RequestDeadline once connected."""

    def __init__(self, *args, deadline: _RequestDeadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)


class _WatchedHTTPConnection(_WatchedConnection, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, http.client.HTTPSConnection):
    pass


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _RequestDeadline):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_WatchedHTTPConnection, req, deadline=self.deadline, **kwargs)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _RequestDeadline):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_WatchedHTTPSConnection, req, deadline=self.deadline, **kwargs)


@dataclass
class ClientStats:
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


class _FailureStreak:
    """Prompts failed in a row across a batch's threads; answers from the endpoint reset it (cache
    hits do not: on a rerun they would hide a dead endpoint between them)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.last: TeacherError | None = None
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def record(self, failure: TeacherError | None) -> None:
        with self._lock:
            if failure is None:
                self.count = 0
                return
            self.count += 1
            self.last = failure
            if self.count >= self.limit:
                self.stopped.set()


class ChatCompletionsClient:
    """A small, thread-safe chat-completions client with retries and an answer cache.

    `sleep` and `clock` (unix seconds, read for Retry-After dates) are injectable so that tests
    drive the backoff without waiting."""

    def __init__(self, config: TeacherConfig, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        self.config = config.validated()
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir is not None else None
        self.stats = ClientStats()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------
    def request_body(self, messages: list[dict]) -> dict:
        return {"model": self.config.model, "messages": messages,
                "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}

    @staticmethod
    def cache_key(body: dict) -> str:
        # The whole request body: model, messages and sampling params; sorted for stability.
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def complete(self, messages: list[dict]) -> str:
        return self._complete(messages)[0]

    def _complete(self, messages: list[dict]) -> tuple[str, bool]:
        """(answer, whether it came from the cache)."""
        body = self.request_body(messages)
        key = self.cache_key(body)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.stats.add(cache_hits=1)
                return cached, True
        content = self._post_with_retries(body)
        if self.cache is not None:
            self.cache.put(key, content, body)
        return content, False

    def complete_many(self, conversations: Sequence[list[dict]], *, progress: bool = False,
                      desc: str = "teacher") -> list[str]:
        """Answers in input order. Identical prompts are sent once. At most `max_concurrency`
        requests are in flight. If some fail, the rest still finish (and are cached) before a
        `TeacherBatchError` is raised; after `max_failure_streak` failures in a row no new prompt
        is sent and `TeacherUnavailable` is raised once the ones in flight are done."""
        keys = [self.cache_key(self.request_body(c)) for c in conversations]
        first_index: dict[str, int] = {}
        for index, key in enumerate(keys):
            first_index.setdefault(key, index)
        unique = sorted(first_index.values())
        answers: dict[str, str] = {}
        failures: list[tuple[int, TeacherError]] = []
        streak = _FailureStreak(self.config.max_failure_streak)
        bar = None
        if progress and len(unique) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(unique), desc=desc, unit="prompt", leave=False)
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency, thread_name_prefix="teacher") as pool:
            futures = {index: pool.submit(self._complete_in_batch, conversations[index], streak)
                       for index in unique}
            for index, future in futures.items():
                try:
                    answer = future.result()
                except TeacherError as exc:
                    failures.append((index, exc))
                else:
                    if answer is not None:
                        answers[keys[index]] = answer
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if streak.stopped.is_set():
            not_sent = len(unique) - len(answers) - len(failures)
            raise TeacherUnavailable(streak.count, streak.last, len(answers), not_sent, len(unique),
                                     self.config.endpoint)
        if failures:
            raise TeacherBatchError(failures, len(unique))
        return [answers[key] for key in keys]

    def _complete_in_batch(self, messages: list[dict], streak: _FailureStreak) -> str | None:
        """One prompt of a batch; None when the batch stopped before it was sent."""
        if streak.stopped.is_set():
            return None
        try:
            answer, cached = self._complete(messages)
        except TeacherError as exc:
            streak.record(exc)
            raise
        if not cached:
            streak.record(None)
        return answer

    # -- internals ----------------------------------------------------------------------------
    def _backoff_s(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            # The server said when to come back; do not come back sooner, nor wait unboundedly.
            return min(max(retry_after_s, 0.0), self.config.retry_after_max_s)
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * (2 ** attempt))
        with self._rng_lock:
            # "Equal jitter": at least half the exponential step, so retries from many threads
            # spread out without collapsing to zero wait.
            return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _post_with_retries(self, body: dict) -> str:
        attempts = self.config.max_retries + 1
        last_problem = "no attempt made"
        empty_answers = 0
        for attempt in range(attempts):
            try:
                return self._post_once(body)
            except _EmptyAnswer:
                empty_answers += 1
                if empty_answers == 2 or attempt + 1 == attempts:
                    raise TeacherEmptyAnswer(self.config.endpoint, self.config.model) from None
                # The server answered; asking again at once is the one retry an empty answer gets.
                log.debug("teacher attempt %d answered an empty completion; asking once more", attempt + 1)
                self.stats.add(retries=1)
                continue
            except _TransientFailure as failure:
                last_problem = failure.problem
                if attempt + 1 == attempts:
                    break
                wait = self._backoff_s(attempt, failure.retry_after_s)
                log.debug("teacher attempt %d failed (%s); retrying in %.3fs", attempt + 1, failure.problem, wait)
                self.stats.add(retries=1)
                self._sleep(wait)
        raise TeacherRetriesExhausted(attempts, last_problem, self.config.endpoint)

    def _post_once(self, body: dict) -> str:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        request = urllib.request.Request(self.config.endpoint, data=data, headers=headers, method="POST")
        self.stats.add(requests=1)
        timeout = self.config.timeout_s
        deadline = _RequestDeadline(timeout)
        # build_opener keeps the default handlers (proxies from the environment included) and
        # puts these two in place of the plain HTTP(S) ones.
        opener = urllib.request.build_opener(_WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline))
        late = f"no answer within {timeout}s"
        try:
            with deadline:
                try:
                    with opener.open(request, timeout=timeout) as response:
                        raw = response.read()
                except urllib.error.HTTPError as exc:
                    status, text = exc.code, _read_error_body(exc)
                    if status in _RETRIED_STATUSES or status >= 500:
                        raise _TransientFailure(f"HTTP {status}: {text[:200]}", _parse_retry_after(
                            exc.headers.get("Retry-After"), self._clock)) from None
                    raise TeacherRequestError(status, text, self.config.endpoint) from None
        except TimeoutError:
            raise _TransientFailure(late) from None
        except urllib.error.URLError as exc:
            if deadline.expired or isinstance(exc.reason, TimeoutError):
                raise _TransientFailure(late) from None
            raise _TransientFailure(f"connection failed: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # reset or truncated mid-body
            raise _TransientFailure(late if deadline.expired else f"connection failed: {exc}") from None
        try:
            return _extract_content(raw)
        except _MalformedResponse as exc:
            # A body cut short by the deadline (no Content-Length: read until the socket closed).
            raise _TransientFailure(late if deadline.expired else f"malformed response: {exc}") from None


def _read_error_body(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _parse_retry_after(value: str | None, clock: Callable[[], float] = time.time) -> float | None:
    """Retry-After is delay-seconds or an HTTP date (RFC 9110 10.2.3); fractional seconds are
    accepted too since some gateways send them."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        log.warning("ignoring unparseable Retry-After header %r", value)
        return None
    return max(0.0, when.timestamp() - clock())


def _extract_content(raw: bytes) -> str:
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _MalformedResponse(f"body is not JSON ({exc.__class__.__name__}: {raw[:80]!r})") from None
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _MalformedResponse("no choices[0].message.content in the body") from None
    if not isinstance(content, str):
        raise _MalformedResponse("choices[0].message.content is not a string")
    if not content.strip():
        raise _EmptyAnswer()
    return content


# -- prompts (our own wording) -----------------------------------------------------------------

_SYSTEM = ("You help build training data for a shopping assistant. You answer with one short "
           "phrase in plain English, with no preamble, no quotes and no list.")


def _describe_item(item: ItemView, *, with_review: bool, review_chars: int = 300) -> str:
    parts = [item.title.strip() or item.item_id]
    labels = clean_category_labels(item.categories)
    if labels:
        parts.append(f"[{' > '.join(labels)}]")
    if with_review and item.review:
        parts.append(f'review: "{" ".join(item.review.split())[:review_chars]}"')
    return " ".join(parts)


def preference_prompt(history: Sequence[ItemView]) -> list[dict]:
    lines = "\n".join(f"- {_describe_item(item, with_review=True)}" for item in history)
    user = ("Here are the products one shopper bought, oldest first, with their own review where "
            f"they wrote one:\n{lines}\n\nComplete the sentence 'This shopper has a taste for ...' "
            "with a short phrase (at most 25 words) about what they look for in a product, for "
            "example: fast racing games they can play with friends on the couch. Speak about their "
            "taste in general terms, do not list product names, and answer with the phrase only.")
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def intention_prompt(target: ItemView, review: str | None) -> list[dict]:
    described = _describe_item(target, with_review=False)
    if review and review.strip():
        evidence = f'The shopper later wrote this review of it: "{" ".join(review.split())[:800]}"'
    else:
        extra = []
        if target.brand:
            extra.append(f"brand: {target.brand}")
        if target.description:
            extra.append(f"description: {' '.join(target.description.split())[:400]}")
        evidence = "There is no review; here is what the listing says. " + ("; ".join(extra) or "(nothing more)")
    user = (f"A shopper bought this product: {described}\n{evidence}\n\nComplete the sentence "
            "'Before buying, the shopper was looking for ...' with a short phrase (at most 20 words) "
            "in everyday language, for example: a present my nephew will enjoy on long car trips. "
            "Keep it vague: do not name the product, its brand or its exact category. Answer with "
            "the phrase only.")
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def clean_sentence(text: str) -> str:
    """The first non-empty line of an answer, without wrapping quotes, list markers or the final
    period (templates add their own punctuation after the phrase)."""
    for line in text.strip().splitlines():
        line = line.strip().lstrip("-*• ").strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
            line = line[1:-1].strip()
        line = line.rstrip(" .")
        if line:
            return line
    return text.strip()


class TeacherAnnotator(Annotator):
    """P2 and I1 from a teacher LLM; I2 from the categories, as for every annotator."""

    def __init__(self, config: TeacherConfig | None = None, *, client: ChatCompletionsClient | None = None,
                 progress: bool = True):
        if client is None:
            client = ChatCompletionsClient(config or TeacherConfig.from_env())
        self.client = client
        self.progress = progress
        self.name = f"teacher:{client.config.model}"

    def explicit_preference(self, user_history: list[ItemView]) -> str:
        return clean_sentence(self.client.complete(preference_prompt(user_history)))

    def vague_intention(self, target: ItemView, review: str | None) -> str:
        return clean_sentence(self.client.complete(intention_prompt(target, review)))

    def explicit_preferences(self, histories: Sequence[list[ItemView]]) -> list[str]:
        answers = self.client.complete_many([preference_prompt(h) for h in histories],
                                            progress=self.progress, desc="teacher P2")
        return [clean_sentence(a) for a in answers]

    def vague_intentions(self, requests: Sequence[tuple[ItemView, str | None]]) -> list[str]:
        answers = self.client.complete_many([intention_prompt(t, r) for t, r in requests],
                                            progress=self.progress, desc="teacher I1")
        return [clean_sentence(a) for a in answers]

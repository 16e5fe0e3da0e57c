"""Teacher annotator: P2 and I1 written by an LLM behind any OpenAI-compatible chat-completions
endpoint (OpenAI, vLLM, llama.cpp server, Ollama's /v1, ...).

Configuration comes from the environment (see `TeacherConfig.from_env`). The client uses only the
standard library, runs a bounded number of requests at once, retries transient failures with
exponential backoff and jitter (honouring Retry-After), and keeps an on-disk cache with one small
JSON file per answer, keyed by sha256(model, messages, sampling params) and written atomically,
so a rerun pays nothing twice and an interrupted run resumes where it stopped.

Error policy (decided here, relied on by the builder):
- 429, 408, 409 and 5xx responses, timeouts and connection failures are transient: retried.
- A 200 response whose body is not JSON, or has no `choices[0].message.content` string, is also
  retried: proxies and overloaded servers do return truncated or HTML bodies, and a second try
  usually succeeds. After the last attempt it is reported as `TeacherRetriesExhausted` with
  `last_problem` saying the body was malformed.
- Any other 4xx (bad request, bad key, unknown model) is not retried: `TeacherRequestError` at once,
  since repeating the same request cannot fix it.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "TeacherConfig":
        """Read the endpoint from the environment. Required: INSTRUCTREC_TEACHER_BASE_URL (the
        OpenAI-style base, e.g. https://api.openai.com/v1) and INSTRUCTREC_TEACHER_MODEL.
        Optional: INSTRUCTREC_TEACHER_API_KEY (sent as a Bearer token; local servers often need
        none), INSTRUCTREC_TEACHER_CONCURRENCY (8), INSTRUCTREC_TEACHER_TIMEOUT_S (60),
        INSTRUCTREC_TEACHER_MAX_RETRIES (5), INSTRUCTREC_TEACHER_CACHE_DIR (none: the builder
        puts it under its output directory)."""
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
                                (ENV_MAX_RETRIES, "max_retries", int)):
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
        if self.max_concurrency < 1:
            raise InputError(ENV_CONCURRENCY, f"must be >= 1, got {self.max_concurrency}", "use 1 to 64")
        if self.timeout_s <= 0:
            raise InputError(ENV_TIMEOUT, f"must be > 0, got {self.timeout_s}", "seconds, e.g. 60")
        if self.max_retries < 0:
            raise InputError(ENV_MAX_RETRIES, f"must be >= 0, got {self.max_retries}", "e.g. 5")
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


class ChatCompletionsClient:
    """A small, thread-safe chat-completions client with retries and an answer cache."""

    def __init__(self, config: TeacherConfig, *, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        self.config = config.validated()
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir is not None else None
        self.stats = ClientStats()
        self._sleep = sleep
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
        body = self.request_body(messages)
        key = self.cache_key(body)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.stats.add(cache_hits=1)
                return cached
        content = self._post_with_retries(body)
        if self.cache is not None:
            self.cache.put(key, content, body)
        return content

    def complete_many(self, conversations: Sequence[list[dict]], *, progress: bool = False,
                      desc: str = "teacher") -> list[str]:
        """Answers in input order. Identical prompts are sent once. At most `max_concurrency`
        requests are in flight. If some fail, the rest still finish (and are cached) before a
        `TeacherBatchError` is raised."""
        keys = [self.cache_key(self.request_body(c)) for c in conversations]
        first_index: dict[str, int] = {}
        for index, key in enumerate(keys):
            first_index.setdefault(key, index)
        unique = sorted(first_index.values())
        answers: dict[str, str] = {}
        failures: list[tuple[int, TeacherError]] = []
        bar = None
        if progress and len(unique) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(unique), desc=desc, unit="prompt", leave=False)
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency, thread_name_prefix="teacher") as pool:
            futures = {index: pool.submit(self.complete, conversations[index]) for index in unique}
            for index, future in futures.items():
                try:
                    answers[keys[index]] = future.result()
                except TeacherError as exc:
                    failures.append((index, exc))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if failures:
            raise TeacherBatchError(failures, len(unique))
        return [answers[key] for key in keys]

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
        for attempt in range(attempts):
            try:
                return self._post_once(body)
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
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            text = _read_error_body(exc)
            if status in _RETRIED_STATUSES or status >= 500:
                raise _TransientFailure(f"HTTP {status}: {text[:200]}",
                                        _parse_retry_after(exc.headers.get("Retry-After"))) from None
            raise TeacherRequestError(status, text, self.config.endpoint) from None
        except TimeoutError:
            raise _TransientFailure(f"no answer within {self.config.timeout_s}s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _TransientFailure(f"no answer within {self.config.timeout_s}s") from None
            raise _TransientFailure(f"connection failed: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # reset or truncated mid-body
            raise _TransientFailure(f"connection failed: {exc}") from None
        try:
            return _extract_content(raw)
        except _MalformedResponse as exc:
            raise _TransientFailure(f"malformed response: {exc}") from None


def _read_error_body(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _parse_retry_after(value: str | None) -> float | None:
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
    return max(0.0, when.timestamp() - time.time())


def _extract_content(raw: bytes) -> str:
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _MalformedResponse(f"body is not JSON ({exc.__class__.__name__}: {raw[:80]!r})") from None
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _MalformedResponse("no choices[0].message.content in the body") from None
    if not isinstance(content, str) or not content.strip():
        raise _MalformedResponse("choices[0].message.content is empty or not a string")
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

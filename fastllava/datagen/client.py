"""Chat completions over any OpenAI-compatible endpoint, with bounded retries and a key that stays secret.

The key is read from $FASTLLAVA_DATAGEN_API_KEY, else $OPENAI_API_KEY; it goes into the Authorization
header and nowhere else: every message this module produces passes through `scrub`, so an endpoint that
echoes the header in an error body cannot put it in a log.

Retries are ours, not the openai client's (it is built with max_retries=0): HTTP 408/409/429/5xx, timeouts
and connection errors are retried `max_retries` times with exponential backoff, at least as long as a
Retry-After header asks; other errors (401, 404, a bad request) fail at once.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from ..extras import require

KEY_ENV = ("FASTLLAVA_DATAGEN_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_WAIT = 60.0  # seconds: a cap on one backoff, whatever Retry-After says


def openai_module():
    """The openai package (the `datagen` extra), or MissingExtra saying how to install it."""
    return require("openai", "python -m fastllava.datagen")


def api_key() -> str | None:
    return next((os.environ[name] for name in KEY_ENV if os.environ.get(name)), None)


def scrub(text: str) -> str:
    """`text` with the API key replaced by ***."""
    key = api_key()
    return text.replace(key, "***") if key else text


class RequestFailed(RuntimeError):
    """A request that failed for good (retries spent, or an error not worth retrying); no key in the text."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


@dataclass
class Reply:
    text: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int


class ChatClient:
    """`ChatClient(base_url, model).chat(messages)` -> Reply. Thread-safe (the openai client is)."""

    def __init__(self, base_url: str, model: str, *, timeout: float = 120.0, max_retries: int = 5,
                 backoff: float = 1.0, temperature: float = 0.7, max_tokens: int = 1024,
                 sleep: Callable[[float], None] = time.sleep):
        self._openai = openai = openai_module()
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint must be an http(s) URL such as https://api.openai.com/v1, got "
                             f"{scrub(base_url)!r}")
        host = parts.hostname + ("" if parts.port is None else f":{parts.port}")
        # What messages show: no user:password@ and no query, where a key could hide.
        self.where = urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
        # openai appends "/chat/completions" to base_url; accept the full endpoint too.
        base = base_url.rstrip("/")
        base = base.removesuffix("/chat/completions")
        # A placeholder key: local servers need none, and the openai client refuses to start without one.
        self._client = openai.OpenAI(base_url=base, api_key=api_key() or "none", timeout=timeout, max_retries=0)
        self.model, self.max_retries, self.backoff = model, max_retries, backoff
        self.temperature, self.max_tokens, self._sleep = temperature, max_tokens, sleep

    def __repr__(self) -> str:
        return f"ChatClient(url={self.where!r}, model={self.model!r})"

    def _retry_after(self, error) -> float:
        response = getattr(error, "response", None)
        value = response.headers.get("retry-after") if response is not None else None
        try:
            return float(value) if value is not None else 0.0
        except ValueError:  # an HTTP date: fall back to our backoff
            return 0.0

    def chat(self, messages: list[dict[str, str]]) -> Reply:
        """The reply to `messages`; raises RequestFailed after the retries."""
        openai = self._openai
        problem = ""
        for attempt in range(1, self.max_retries + 2):
            wait = 0.0
            try:
                completion = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
                usage = completion.usage
                text = completion.choices[0].message.content if completion.choices else None
                return Reply(text, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0,
                             attempt)
            except openai.APIStatusError as e:
                problem = scrub(f"HTTP {e.status_code}: {str(e)[:300]}")
                if e.status_code not in RETRY_STATUS:
                    raise RequestFailed(f"{self.where} (model {self.model}): {problem}", attempt) from None
                wait = self._retry_after(e)
            except openai.APITimeoutError:
                problem = "timed out"
            except openai.APIConnectionError as e:
                problem = scrub(f"connection error: {e.__cause__ or e}")
            except (openai.APIError, ValueError, AttributeError, IndexError, TypeError) as e:
                problem = scrub(f"unexpected reply ({type(e).__name__}: {str(e)[:300]})")
            if attempt <= self.max_retries:
                self._sleep(min(max(wait, self.backoff * 2 ** (attempt - 1)), MAX_WAIT))
        raise RequestFailed(f"{self.where} (model {self.model}) failed after {self.max_retries + 1} attempts: {problem}",
                            self.max_retries + 1)

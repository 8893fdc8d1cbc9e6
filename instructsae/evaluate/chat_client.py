"""One call to an OpenAI-compatible chat-completions endpoint, with the stdlib only (no SDK dependency)."""

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request

from instructsae.errors import UserError

RETRYABLE_STATUS = {429, 500, 502, 503, 504}
BACKOFF_S = 0.5  # the first wait; each retry waits twice as long as the one before, up to MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0


def api_key_from_env(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise UserError(f"--api-key-env names {variable}, but that environment variable is not set")
    return key


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:120]


def reply_content(payload: bytes, url: str) -> str:
    """choices[0].message.content of a reply, or one line naming the URL."""
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"endpoint {url} sent a malformed reply (expected JSON with choices[0].message.content): "
                        f"{_first_line(payload.decode('utf-8', 'replace'))!r}") from None
    if not isinstance(content, str):
        raise UserError(f"endpoint {url} sent a reply whose message content is not text")
    return content


def backoff_s(attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before retry attempt+1: the server's Retry-After in seconds if it names one (capped),
    else BACKOFF_S * 2**attempt with up to 50% random jitter (so concurrent requests spread out), capped."""
    if retry_after is not None and retry_after.strip().isdigit():
        return min(float(retry_after), MAX_BACKOFF_S)
    return min(BACKOFF_S * 2 ** attempt * (1 + random.random() / 2), MAX_BACKOFF_S)


def chat_completion(base_url: str, model: str, messages: list[dict], api_key: str | None = None,
                    timeout_s: float = 60.0, retries: int = 2) -> str:
    """The reply text to `messages` at temperature 0. Timeouts, refused connections, 429 and 5xx are retried
    after an exponential backoff with jitter (or the server's Retry-After, when it gives seconds)."""
    url = base_url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": model, "messages": messages, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        last_attempt = attempt == retries
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return reply_content(response.read(), url)
        except urllib.error.HTTPError as error:
            if error.code not in RETRYABLE_STATUS or last_attempt:
                detail = _first_line(error.read().decode("utf-8", "replace")) or error.reason
                raise UserError(f"endpoint {url} answered HTTP {error.code}: {detail}") from None
            time.sleep(backoff_s(attempt, error.headers.get("Retry-After") if error.headers else None))
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
            if last_attempt:
                reason = getattr(error, "reason", error)
                raise UserError(f"endpoint {url} is unreachable after {retries + 1} attempts: {reason}") from None
            time.sleep(backoff_s(attempt))
    raise AssertionError("unreachable: the last attempt returns or raises")

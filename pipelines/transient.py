"""Transient read errors (HTTP 5xx and 429, connection resets, timeouts, S3 throttling) retried with jittered,
bounded exponential backoff; anything else, or the last failure, is raised as it is (the work item fails loudly).

Common Crawl answers bursts with "503 Slow Down" and asks clients to back off and retry.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import aiohttp

ATTEMPTS = 5
FIRST_DELAY_S, MAX_DELAY_S = 0.2, 20.0
_THROTTLED = ("SlowDown", "Throttl", "RequestLimitExceeded", "ServiceUnavailable", "InternalError")
T = TypeVar("T")
logger = logging.getLogger(__name__)


def is_transient(error: BaseException, url: str) -> bool:
    if isinstance(error, aiohttp.ClientResponseError):
        return error.status >= 500 or error.status == 429
    if isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError,
                          TimeoutError, asyncio.TimeoutError)):
        return True
    if isinstance(error, FileNotFoundError) and url.startswith(("http://", "https://")):
        return True  # fsspec's HTTP `info` reports a 5xx on both HEAD and GET as "not found"
    return isinstance(error, OSError) and any(word in str(error) for word in _THROTTLED)  # S3 (s3fs, botocore)


def retrying(call: Callable[[], T], url: str, attempts: int = ATTEMPTS) -> T:
    """`call()`, again after a transient error of reading `url`, at most `attempts` times in all."""
    attempt = 1
    while True:
        try:
            return call()
        except Exception as e:
            if attempt >= attempts or not is_transient(e, url):
                raise
            delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)  # jitter: no herd
            logger.warning("reading %s: %s: %s; retry %d of %d in %.1f s", url, type(e).__name__, e, attempt,
                           attempts - 1, delay)
            time.sleep(delay)
            attempt += 1

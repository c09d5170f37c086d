"""Resumable HTTP(S) downloads with the standard library: one large file, or many small ones in threads.

A file is written to `<dest>.part` and renamed to `dest` only once it is complete: its size equals the
server's total (Content-Length / Content-Range) and the published size and sha256 where the caller knows
them. So a file at `dest` is always a whole one, and an interrupted run resumes from the `.part` with a
Range request. A server that ignores Range (answers 200 to it) restarts the file from byte 0.

Connection errors, timeouts, a stream that ends early, 429 and 5xx are retried with exponential backoff
(each retry resumes); any other HTTP error (404, 403, 401) stops at once with DownloadError naming the
URL and what it was for. A finished file that fails its size or sha256 check is deleted, never renamed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Sequence

from ...progress import progress

CHUNK = 1 << 20  # bytes per read: one progress update per MiB
RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)


class DownloadError(RuntimeError):
    """A file that could not be downloaded whole; the message names the URL, what it was for, and why.
    `status` is the HTTP status that stopped it (404: the file is not there), None for any other reason;
    `unreachable` says the last attempt could not connect to the server at all."""

    def __init__(self, message: str, status: int | None = None, unreachable: bool = False):
        super().__init__(message)
        self.status = status
        self.unreachable = unreachable


class _Retry(Exception):
    """An attempt that failed in a way the next attempt may not (the connection, the server's load)."""


class _CannotConnect(_Retry):
    """An attempt that reached no server (DNS, refused, no route, a connect timeout)."""


def _total_of(resp, offset: int) -> int | None:
    """The whole file's size from a 206's Content-Range ("bytes 100-199/200") or a 200's Content-Length."""
    if resp.status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
        if not m or int(m.group(1)) != offset:
            raise _Retry(f"the server answered a range request for byte {offset} with "
                         f"Content-Range {resp.headers.get('Content-Range')!r}")
        return None if m.group(3) == "*" else int(m.group(3))
    length = resp.headers.get("Content-Length")
    return int(length) if length is not None else None


def _attempt(url: str, part: str, what: str, timeout: float, headers: dict[str, str], show: bool, desc: str) -> None:
    """One request continuing `part` to the end of the file; raises _Retry or DownloadError."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={offset}-"} if offset else {})})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part is not a prefix the server can continue: start again
            os.remove(part)
            raise _Retry(f"HTTP 416 for a range from byte {offset}; restarting the file") from None
        if e.code in RETRYABLE_STATUS:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{url} ({what}): HTTP {e.code} {e.reason}", status=e.code) from None
    except (urllib.error.URLError, OSError) as e:
        raise _CannotConnect(f"cannot connect: {getattr(e, 'reason', e)}") from None
    with resp:
        if resp.status == 200 and offset:  # the server ignored Range: what it sends starts at byte 0
            offset = 0
        total = _total_of(resp, offset)
        with open(part, "ab" if offset else "wb") as f, \
                progress(total, desc=desc, unit="B", initial=offset, enabled=show) as bar:
            try:
                # read1: what has arrived, at most CHUNK; read() would wait for a full CHUNK and lose the
                # bytes it holds when the connection breaks.
                while chunk := resp.read1(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                raise _Retry(f"the connection broke at byte {bar.n}: {e!r}") from None
        got = os.path.getsize(part)
        if total is not None and got < total:
            raise _Retry(f"the stream ended at byte {got} of {total}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _verify(path: str, url: str, what: str, size: int | None, sha256: str | None) -> None:
    """Raise DownloadError (after deleting `path`) when it is not the published file."""
    got = os.path.getsize(path)
    problem = None
    if size is not None and got != size:
        problem = f"{got} bytes, the published size is {size}"
    elif sha256 is not None and (digest := _sha256(path)) != sha256.lower():
        problem = f"sha256 {digest}, the published one is {sha256}"
    if problem:
        os.remove(path)
        raise DownloadError(f"{url} ({what}): the download is {problem}; deleted {path}, run again to "
                            f"download it again (if it fails again, the source has changed)")


def download(url: str, dest: str, *, what: str, size: int | None = None, sha256: str | None = None,
             retries: int = 5, backoff: float = 2.0, timeout: float = 60.0, headers: dict[str, str] | None = None,
             show: bool = True, desc: str | None = None) -> str:
    """Download `url` to `dest` (resuming `dest`.part), verify it, and return `dest`.

    Args:
        url: http(s) URL; redirects are followed (the Hub sends large files to its CDN).
        dest: the final path; its folder is created. An existing `dest` is taken as complete (only whole
            files are renamed into place) after its size/sha256 check, and not fetched again.
        what: what the file is for, in every error ("llava-1.5-pretrain: images.zip").
        size, sha256: the published size in bytes and sha256 hex digest, checked where given.
        retries: attempts after the first for retryable failures; the wait before retry k is backoff * 2**k s.
        timeout: seconds a connect or a read may block before the attempt counts as broken.
        headers: extra request headers (an Authorization token).
        show: a progress bar on a terminal, a plain line every few seconds elsewhere (progress.py).
        desc: what the progress display is called (default: dest's file name).
    """
    if os.path.exists(dest):
        _verify(dest, url, what, size, sha256)
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    for attempt in range(retries + 1):
        try:
            _attempt(url, part, what, timeout, headers or {}, show, desc or os.path.basename(dest))
            break
        except _Retry as e:
            if attempt == retries:
                raise DownloadError(f"{url} ({what}): {e}; gave up after {retries + 1} attempts. Run again "
                                    f"to resume from the {os.path.getsize(part) if os.path.exists(part) else 0} "
                                    f"bytes kept in {part}", unreachable=isinstance(e, _CannotConnect)) from None
            wait = backoff * 2 ** attempt
            print(f"{os.path.basename(dest)}: {e}; retrying in {wait:.1f}s", flush=True)
            time.sleep(wait)
    _verify(part, url, what, size, sha256)
    os.replace(part, dest)
    return dest


def download_many(items: Sequence[tuple[str, str]], *, what: str, workers: int = 16,
                  **kwargs) -> list[tuple[str, str, DownloadError]]:
    """Download many small files [(url, dest), ...] in `workers` threads, each as `download` does.

    One progress display counts files; a file that fails does not stop the others. Returns the failures
    as [(url, dest, DownloadError), ...], empty when every file is in place.
    """
    failures = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress(len(items), desc=what, unit="file", enabled=kwargs.pop("show", True)) as bar:
        futures = {pool.submit(download, url, dest, what=what, show=False, **kwargs): (url, dest)
                   for url, dest in items}
        for fut in as_completed(futures):
            try:
                fut.result()
            except DownloadError as e:
                failures.append((*futures[fut], e))
                bar.set_postfix(f"failed {len(failures)}")
            bar.update(1)
    return failures

"""Download a dataset archive over http(s): within a deadline and a size cap, sha256-checked,
credentials from ~/.netrc, never a partial file left behind.

The file is written to a scratch file (src.core.files.scratch): a failure removes it, and one
left by a killed run is removed at the next stage start. The size is checked against the cap
and the free disk from Content-Length before the first byte, and counted while reading (a
server may send no length, or lie). URLs are printed without user:password@ or query.
"""
import base64
import hashlib
import http.client
import netrc
import os
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from src.core.errors import UserError, first_line
from src.core.files import scratch
from src.core.params import redact_url
from src.data.archives import ensure_free_space, gib

MAX_BYTES = 100 << 30     # 100 GiB: a larger dataset is better downloaded once by hand and named by path
DEADLINE_S = 4 * 3600     # the whole download; 100 GiB takes ~2.5 h at 100 Mbit/s
READ_TIMEOUT_S = 60       # silence from the server that long is an error
CHUNK = 1 << 16


def netrc_authorization(url):
    """A Basic Authorization header from ~/.netrc (or $NETRC) for the URL's host, or None."""
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(url).hostname or "")
    except (netrc.NetrcParseError, OSError) as e:
        raise UserError(f"{path}: {e}; fix the file (machine <host> login <user> password <secret>, "
                        f"readable by you only)") from None
    if not entry or not entry[2]:
        return None
    login, _, password = entry
    return "Basic " + base64.b64encode(f"{login or ''}:{password}".encode()).decode()


def check_sha256(actual, expected, source):
    if actual != expected.strip().lower():
        raise UserError(f"data.source={redact_url(source)!r} has sha256 {actual}, but data.sha256 is {expected}; "
                        f"check the URL/file or update data.sha256")


def fetch(url, out, max_bytes, deadline_s):
    """Stream `url` into the open file `out`; its sha256."""
    start = time.monotonic()
    request = urllib.request.Request(url)
    auth = netrc_authorization(url)
    if auth:  # unredirected: a redirect to another host (a CDN, a signed URL) never gets it
        request.add_unredirected_header("Authorization", auth)
    h, got = hashlib.sha256(), 0
    with urllib.request.urlopen(request, timeout=min(READ_TIMEOUT_S, deadline_s)) as response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit():
            if int(declared) > max_bytes:
                raise UserError(f"data.source={redact_url(url)!r} is {gib(int(declared))}, over the "
                                f"{gib(max_bytes)} download limit; download it yourself and point data.source "
                                f"at the file")
            ensure_free_space(os.path.dirname(out.name) or ".", int(declared), f"data.source={redact_url(url)!r}")
        while chunk := response.read1(CHUNK):
            got += len(chunk)
            if got > max_bytes:
                raise UserError(f"data.source={redact_url(url)!r} sent more than the {gib(max_bytes)} download "
                                f"limit; download it yourself and point data.source at the file")
            if time.monotonic() - start > deadline_s:
                raise UserError(f"data.source={redact_url(url)!r}: the download took over {deadline_s:,} s "
                                f"({got:,} bytes so far); download it yourself and point data.source at the file")
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


def download(url, expected, folder, keep, max_bytes=MAX_BYTES, deadline_s=DEADLINE_S):
    """Download `url` into a scratch file in `folder`, check its sha256, and run keep(path) on it
    while it exists; the file is removed afterwards, whatever happens."""
    with scratch(folder, ".download.") as tmp:
        try:
            try:
                with open(tmp, "wb") as out:
                    digest = fetch(url, out, max_bytes, deadline_s)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                # TimeoutError, HTTPError and URLError are OSErrors; none of their texts holds the URL
                raise UserError(f"data.source={redact_url(url)!r}: download failed ({first_line(e)}); check "
                                f"the URL and the network") from None
            check_sha256(digest, expected, url)
            return keep(tmp)
        finally:
            tmp.unlink(missing_ok=True)

"""Downloads into gpt2lab's cache: streamed to a temporary file, checked, then renamed into place.

Every file gpt2lab fetches (Tiny Shakespeare, HellaSwag, LAMBADA, Alpaca) goes through `download`,
so a failed, partial or tampered download never leaves a cache entry behind, and being offline is
one line that says how to supply the file by hand.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from gpt2lab.errors import UserError

CACHE_ENV = "GPT2LAB_CACHE"


def cache_dir() -> Path:
    """Where downloads are kept: $GPT2LAB_CACHE, else ~/.cache/gpt2lab."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2lab"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    dest: Path,
    *,
    fix: str,
    sha256: str | None = None,
    validate: Callable[[Path], None] | None = None,
    what: str = "",
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest` atomically and return `dest`.

    `sha256` (when known) and `validate(tmp_path)` (which raises UserError) must pass before the file
    is renamed into place. Failures are one-line UserErrors ending with `fix` (how to get the file
    another way); `what` names the file in the message ("Alpaca data from ").
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise UserError(f"cannot write to the download folder {dest.parent} ({e.strerror}); "
                        f"set {CACHE_ENV} to a writable folder") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as e:
                if isinstance(e, urllib.error.HTTPError):
                    reason = f"HTTP {e.code} {e.reason}"
                else:
                    reason = getattr(e, "reason", None) or e
                raise UserError(f"could not download {what}{url} ({reason}); {fix}") from None
        if sha256 is not None:
            got = sha256_file(tmp)
            if got != sha256:
                raise UserError(f"{url} has sha256 {got}, expected {sha256}: the download is damaged or the "
                                f"file changed upstream; {fix}")
        if validate is not None:
            validate(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest

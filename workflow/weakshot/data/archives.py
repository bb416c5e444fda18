"""Dataset archives: download (resumable, verified), checksum verification and safe extraction.

The real archives are 1-3 GB (ADEChallengeData2016.zip, cocostuff-10k-v1.x.zip) and come from plain
HTTP servers, so a download has to survive dropped connections without starting over, and a finished
file must never appear under its final name unless it is complete and matches the pinned size and
checksums. Extraction refuses members that could write outside the target folder, before writing
anything, and only moves the extracted tree into place once it is complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from weakshot.io_utils import atomic_dir

CHUNK_BYTES = 1 << 20  # 1 MiB: large enough for throughput, small enough to keep progress responsive
LOG_INTERVAL_S = 30.0  # how often to print a progress line when stderr is not a terminal (Snakemake logs)
USER_AGENT = "weakshot-downloader/0.1"
# HTTP statuses worth retrying: the server is overloaded or a proxy timed out, not a wrong URL.
TRANSIENT_HTTP_CODES = frozenset({408, 425, 429, 500, 502, 503, 504})
HEX_LENGTHS = {"sha256": 64, "md5": 32}


class ChecksumError(ValueError):
    """A file's size or digest differs from the pinned value."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the extraction folder (or is a link or device)."""


class DownloadError(RuntimeError):
    """A download failed for good (after retries, or with a non-transient HTTP error)."""


class _TransientError(Exception):
    """Internal: the transfer stopped early in a way a retry (with resume) can fix."""


def _say(message: str) -> None:
    """Print a status line to stderr: the CLI configures no logging, and Snakemake keeps stderr in its logs."""
    print(f"[weakshot] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def _normalise_digest(kind: str, value: str | None) -> str | None:
    """Lower-case and validate a configured hex digest so a typo fails before a 2 GB download."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    if len(text) != HEX_LENGTHS[kind] or not re.fullmatch(r"[0-9a-f]+", text):
        raise ValueError(f"{kind}: {value!r} is not a {HEX_LENGTHS[kind]}-digit hexadecimal digest")
    return text


def file_digests(path: str | os.PathLike, kinds: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hash ``path`` once, streaming, with every algorithm in ``kinds`` (names understood by hashlib)."""
    hashers = {kind: hashlib.new(kind) for kind in kinds}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {kind: hasher.hexdigest() for kind, hasher in hashers.items()}


def verify(
    path: str | os.PathLike,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    source: str | None = None,
) -> dict[str, str]:
    """Check ``path`` against the given size and digests; raise ChecksumError naming both values.

    The size is compared first because it is free and catches most truncated downloads without
    reading gigabytes. Returns the computed digests (empty when none was asked for). ``source``
    (the URL) only makes the error message more useful.
    """
    path = Path(path)
    where = f"{path}" + (f" (from {source})" if source else "")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    expected = {"sha256": _normalise_digest("sha256", sha256), "md5": _normalise_digest("md5", md5)}
    if expected_size is not None:
        actual_size = path.stat().st_size
        if actual_size != int(expected_size):
            raise ChecksumError(f"{where}: size mismatch: expected {int(expected_size)} bytes, got {actual_size}")
    wanted = tuple(kind for kind, value in expected.items() if value is not None)
    if not wanted:
        return {}
    actual = file_digests(path, wanted)
    for kind in wanted:
        if actual[kind] != expected[kind]:
            raise ChecksumError(f"{where}: {kind} mismatch: expected {expected[kind]}, got {actual[kind]}")
    return actual


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on a terminal; otherwise a plain progress line every LOG_INTERVAL_S seconds."""

    def __init__(self, label: str, total: int | None, initial: int, enabled: bool) -> None:
        self.label = label
        self.total = total
        self.done = initial
        self.interactive = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.last_log = time.monotonic()
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            file=sys.stderr,
            disable=not self.interactive,
            mininterval=0.5,
        )

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if self.enabled and not self.interactive and now - self.last_log >= LOG_INTERVAL_S:
            self.last_log = now
            _say(f"{self.label}: {self._describe()}")

    def _describe(self) -> str:
        mib = self.done / 2**20
        if self.total:
            return f"{mib:.1f} / {self.total / 2**20:.1f} MiB ({100.0 * self.done / self.total:.0f}%)"
        return f"{mib:.1f} MiB"

    def close(self) -> None:
        self.bar.close()


def _copy_stream(src: BinaryIO, dst: BinaryIO, progress: _Progress) -> int:
    """Copy until EOF, chunk by chunk, returning the bytes copied (what was written stays on error)."""
    copied = 0
    while chunk := src.read(CHUNK_BYTES):
        dst.write(chunk)
        copied += len(chunk)
        progress.update(len(chunk))
    return copied


def _local_source(url: str) -> Path | None:
    """The local file behind a ``file://`` URL or a plain path; None for http(s)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{url}: file:// URLs must name a local file (host {parsed.netloc!r} given)")
        return Path(urllib.request.url2pathname(parsed.path))
    # A single letter "scheme" is a Windows drive (C:\...), i.e. a plain path as well.
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return Path(url)
    raise ValueError(f"{url}: unsupported URL scheme {parsed.scheme!r} (use http(s)://, file:// or a local path)")


def _fetch_local(source: Path, part: Path, progress: bool) -> None:
    """Copy a local archive into ``part`` (no resume: a local copy is fast and cannot drop)."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: file not found")
    bar = _Progress(source.name, source.stat().st_size, 0, progress)
    try:
        with open(source, "rb") as src, open(part, "wb") as dst:
            _copy_stream(src, dst, bar)
            dst.flush()
            os.fsync(dst.fileno())
    finally:
        bar.close()


@dataclass(frozen=True)
class _RangeInfo:
    """A parsed ``Content-Range`` header: ``bytes start-end/total`` or ``bytes */total``."""

    start: int | None
    total: int | None


def _parse_content_range(value: str | None) -> _RangeInfo:
    if not value:
        return _RangeInfo(None, None)
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if not match:
        return _RangeInfo(None, None)
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return _RangeInfo(start, total)


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _check_announced_size(url: str, part: Path, total: int | None, expected_size: int | None) -> None:
    """Fail before transferring gigabytes when the server announces a size other than the pinned one.

    Any partial file is deleted too: it holds bytes of a file that is not the pinned one.
    """
    if total is not None and expected_size is not None and total != expected_size:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{url}: size mismatch: expected {expected_size} bytes, the server announces {total} "
            f"(wrong URL or a changed file?); nothing was written to {part.with_suffix('')}"
        )


def _http_attempt(url: str, part: Path, *, expected_size: int | None, timeout: float, progress: bool) -> None:
    """One HTTP request that appends to ``part`` (resuming with Range when it holds bytes already).

    Raises _TransientError when the connection dropped early (the caller retries and resumes),
    DownloadError for a definite failure.
    """
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        _say(f"{part}: partial file is larger than the expected {expected_size} bytes; starting over")
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return  # complete already; verification decides whether it is the right file
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Range not satisfiable: the part already ends at (or past) the end of the file.
            total = _parse_content_range(err.headers.get("Content-Range")).total
            err.close()
            if total is None or total == offset:
                return
            _say(f"{part}: server says the file has {total} bytes but {offset} are on disk; starting over")
            part.unlink()
            raise _TransientError("partial file inconsistent with the server's size") from None
        err.close()
        if err.code in TRANSIENT_HTTP_CODES:
            raise _TransientError(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    with response:
        status = response.status
        length = _int_header(response.headers.get("Content-Length"))
        if status == 206:
            content_range = _parse_content_range(response.headers.get("Content-Range"))
            if content_range.start != offset:
                # The server sent some other range; appending it would corrupt the file.
                _say(f"{url}: server answered a different range ({content_range.start}); starting over")
                part.unlink(missing_ok=True)
                raise _TransientError("unexpected Content-Range")
            total = content_range.total
            mode = "ab"
        elif status == 200:
            if offset:
                _say(f"{url}: server ignored the Range request; restarting from zero")
            offset = 0
            total = length
            mode = "wb"
        else:
            raise DownloadError(f"{url}: unexpected HTTP status {status}")
        _check_announced_size(url, part, total, expected_size)
        bar = _Progress(Path(part.name).stem, total, offset, progress)
        try:
            with open(part, mode) as f:
                try:
                    received = _copy_stream(response, f, bar)
                except (http.client.IncompleteRead, ConnectionError, TimeoutError) as err:
                    raise _TransientError(f"connection dropped: {err!r}") from None
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            bar.close()
        if length is not None and received < length:
            raise _TransientError(f"connection closed after {received} of {length} bytes")


def _fetch_http(
    url: str, part: Path, *, expected_size: int | None, timeout: float, progress: bool, retries: int, backoff_s: float
) -> None:
    """Run HTTP attempts until one completes; every retry resumes from what ``part`` holds."""
    for attempt in range(1, retries + 1):
        try:
            _http_attempt(url, part, expected_size=expected_size, timeout=timeout, progress=progress)
            return
        except (_TransientError, urllib.error.URLError, ConnectionError, TimeoutError) as err:
            # URLError here means no HTTP answer at all (refused, DNS, reset): worth another try.
            held = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DownloadError(
                    f"{url}: download failed after {retries} attempts ({err}); "
                    f"{held} bytes kept in {part}, run again to resume"
                ) from None
            delay = backoff_s * 2 ** (attempt - 1)
            _say(f"{url}: attempt {attempt}/{retries} failed ({err}); {held} bytes kept, retrying in {delay:.0f} s")
            time.sleep(delay)


def _part_path(out: Path) -> Path:
    return out.with_name(out.name + ".part")


def download(
    url: str,
    out: Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    retries: int = 5,
    backoff_s: float = 2.0,
) -> Path:
    """Download ``url`` (http(s)://, file:// or a local path) to ``out`` and verify it.

    Bytes go to ``out + ".part"``, which later calls and retries resume with ``Range`` requests; the
    part is renamed onto ``out`` only after the size and checksums match, so ``out`` existing means
    "complete and verified". A mismatch deletes the part (its content is wrong, resuming it cannot
    help) and raises ChecksumError. With no checksum configured, the computed sha256 is printed so
    it can be pinned in the config.
    """
    out = Path(out)
    sha256 = _normalise_digest("sha256", sha256)
    md5 = _normalise_digest("md5", md5)
    pinned = expected_size is not None or sha256 is not None or md5 is not None
    if out.exists():
        try:
            verify(out, expected_size=expected_size, sha256=sha256, md5=md5, source=url)
            return out
        except ChecksumError as err:
            _say(f"{err}; downloading it again")
            out.unlink()

    out.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(out)
    local = _local_source(url)
    _say(f"downloading {url} -> {out}")
    if local is not None:
        _fetch_local(local, part, progress)
    else:
        _fetch_http(
            url, part, expected_size=expected_size, timeout=timeout, progress=progress,
            retries=retries, backoff_s=backoff_s,
        )  # fmt: skip

    try:
        if pinned:
            verify(part, expected_size=expected_size, sha256=sha256, md5=md5, source=url)
        else:
            digest = file_digests(part, ("sha256",))["sha256"]
            _say(
                f"{url}: no checksum configured; size {part.stat().st_size} bytes, sha256 {digest} "
                "(pin these in the config to verify future downloads)"
            )
    except ChecksumError as err:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{err}; the downloaded file was deleted and {out} was not written") from None
    os.replace(part, out)
    return out


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------


def _unsafe_name_reason(name: str) -> str | None:
    """Why a member name could escape the extraction folder, or None when it is a plain relative path."""
    if not name or "\x00" in name:
        return "empty name or NUL byte"
    if name.startswith(("/", "\\")):
        return "absolute path"
    if re.match(r"^[A-Za-z]:", name):
        return "drive letter"
    # Zip writers on Windows may use backslashes; extractors on some systems honour them.
    parts = re.split(r"[\\/]+", name)
    if ".." in parts:
        return "'..' component"
    return None


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> Iterator[str]:
    """Yield member names after checking every one (a zip symlink would escape on a later read)."""
    for info in zf.infolist():
        reason = _unsafe_name_reason(info.filename)
        if reason is None and stat.S_ISLNK(info.external_attr >> 16):
            reason = "symbolic link"
        if reason is not None:
            raise UnsafeArchiveError(f"{archive}: refusing member {info.filename!r} ({reason}); nothing was extracted")
        yield info.filename


def _check_tar_members(archive: Path, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tf.getmembers()
    for member in members:
        reason = _unsafe_name_reason(member.name)
        if reason is None:
            if member.issym():
                reason = "symbolic link"
            elif member.islnk():
                reason = "hard link"
            elif member.isdev():
                reason = "device or FIFO"
            elif not (member.isfile() or member.isdir()):
                reason = "special member type"
        if reason is not None:
            raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r} ({reason}); nothing was extracted")
    return members


def _ensure_inside(root: Path, name: str, archive: Path) -> None:
    """Defence in depth: the resolved target of ``name`` must lie under ``root``."""
    target = (root / PurePosixPath(name.replace("\\", "/"))).resolve()
    if target != root and root not in target.parents:
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r} (resolves outside the output folder)")


def safe_extract(archive: Path, out: Path) -> Path:
    """Extract a zip (or tar, tar.gz, ...) archive into ``out``, refusing unsafe members up front.

    Every member is checked before anything is written. Extraction goes to a temporary folder beside
    ``out`` that replaces ``out`` only when complete, so a failure leaves no partial ``out`` (and an
    older ``out`` untouched). A corrupt archive raises ValueError naming it.
    """
    archive = Path(archive)
    out = Path(out)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: archive not found")
    try:
        return _extract(archive, out)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as err:
        raise ValueError(f"{archive}: corrupt archive ({type(err).__name__}: {err}); {out} was not written") from None


def _extract(archive: Path, out: Path) -> Path:
    """Check the members, then extract into a temporary folder that is renamed onto ``out``."""
    _say(f"extracting {archive} -> {out}")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = list(_zip_members(archive, zf))
            with atomic_dir(out) as tmp:
                root = tmp.resolve()
                for name in names:
                    _ensure_inside(root, name, archive)
                for info in zf.infolist():
                    zf.extract(info, tmp)
        _say(f"extracted {len(names)} members of {archive.name}")
        return out
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = _check_tar_members(archive, tf)
            with atomic_dir(out) as tmp:
                root = tmp.resolve()
                for member in members:
                    _ensure_inside(root, member.name, archive)
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4; members were checked above
                    tf.extractall(tmp, members=members)
        _say(f"extracted {len(members)} members of {archive.name}")
        return out
    raise ValueError(f"{archive}: not a zip or tar archive")

"""Download (resume, retries, checksums), verification and safe extraction of dataset archives."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from weakshot import cli
from weakshot.data.archives import (
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    download,
    safe_extract,
    verify,
)

REPO = Path(__file__).resolve().parents[1]


def _payload(size: int = 300_000, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    """Names of temporary or partial files a failed operation might have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".tmp")) or p.name.startswith("."))


# ------------------------------------------------------------------------------------------ verify


def test_verify_accepts_matching_and_rejects_wrong_values(tmp_path: Path) -> None:
    data = _payload(1000)
    path = tmp_path / "a.bin"
    path.write_bytes(data)
    digests = verify(path, expected_size=1000, sha256=_sha256(data).upper(), md5=hashlib.md5(data).hexdigest())
    assert digests == {"sha256": _sha256(data), "md5": hashlib.md5(data).hexdigest()}
    with pytest.raises(ChecksumError, match="size mismatch: expected 999 bytes, got 1000"):
        verify(path, expected_size=999)
    with pytest.raises(ChecksumError, match=f"md5 mismatch: expected {'0' * 32}, got "):
        verify(path, md5="0" * 32)
    with pytest.raises(ValueError, match="sha256: 'abc' is not a 64-digit"):
        verify(path, sha256="abc")


# ---------------------------------------------------------------------------------------- download


def test_download_http_verifies_and_renames(http_server, tmp_path: Path) -> None:
    data = _payload()
    url = http_server.add_file("archive.zip", data)
    out = tmp_path / "dl" / "archive.zip"
    result = download(
        url, out, expected_size=len(data), sha256=_sha256(data), md5=hashlib.md5(data).hexdigest(), progress=False
    )
    assert result == out
    assert out.read_bytes() == data
    assert _leftovers(out.parent) == []
    assert [r.range_header for r in http_server.requests] == [None]


def test_download_wrong_sha256_raises_and_leaves_nothing(http_server, tmp_path: Path) -> None:
    data = _payload()
    url = http_server.add_file("archive.zip", data)
    out = tmp_path / "archive.zip"
    wrong = "ab" * 32
    with pytest.raises(ChecksumError) as info:
        download(url, out, sha256=wrong, progress=False)
    message = str(info.value)
    for needed in (url, str(out), wrong, _sha256(data)):
        assert needed in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_download_wrong_size_announced_by_server_fails_before_transfer(http_server, tmp_path: Path) -> None:
    data = _payload()
    url = http_server.add_file("archive.zip", data)
    out = tmp_path / "archive.zip"
    with pytest.raises(ChecksumError, match=f"expected {len(data) + 1} bytes, the server announces {len(data)}"):
        download(url, out, expected_size=len(data) + 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_resumes_after_connection_drop(http_server, tmp_path: Path) -> None:
    data = _payload()
    url = http_server.add_file("archive.zip", data)
    http_server.drop_after["/archive.zip"] = 100_000
    out = tmp_path / "archive.zip"
    download(url, out, expected_size=len(data), sha256=_sha256(data), progress=False, backoff_s=0)
    assert out.read_bytes() == data
    ranges = [(r.range_header, r.status) for r in http_server.requests]
    assert ranges == [(None, 200), ("bytes=100000-", 206)]
    assert _leftovers(tmp_path) == []


def test_download_resumes_part_left_by_an_earlier_run(http_server, tmp_path: Path) -> None:
    data = _payload()
    url = http_server.add_file("archive.zip", data)
    http_server.drop_after["/archive.zip"] = 70_000
    out = tmp_path / "archive.zip"
    with pytest.raises(DownloadError, match="run again to resume"):
        download(url, out, sha256=_sha256(data), progress=False, retries=1)
    part = tmp_path / "archive.zip.part"
    assert part.stat().st_size == 70_000 and not out.exists()

    download(url, out, sha256=_sha256(data), progress=False, retries=1)
    assert out.read_bytes() == data and not part.exists()
    assert http_server.requests[-1].range_header == "bytes=70000-"
    assert http_server.requests[-1].status == 206


def test_download_restarts_when_server_ignores_range(http_server, tmp_path: Path) -> None:
    data = _payload()
    url = http_server.add_file("archive.zip", data)
    http_server.ignore_range = True
    out = tmp_path / "archive.zip"
    # A stale part with wrong bytes: appending to it would corrupt the file, so 200 must restart.
    (tmp_path / "archive.zip.part").write_bytes(b"\xff" * 5000)
    download(url, out, sha256=_sha256(data), progress=False)
    assert out.read_bytes() == data
    assert [(r.range_header, r.status) for r in http_server.requests] == [("bytes=5000-", 200)]


def test_download_complete_part_answered_with_416(http_server, tmp_path: Path) -> None:
    data = _payload()
    url = http_server.add_file("archive.zip", data)
    out = tmp_path / "archive.zip"
    (tmp_path / "archive.zip.part").write_bytes(data)
    download(url, out, sha256=_sha256(data), progress=False)
    assert out.read_bytes() == data
    assert [(r.range_header, r.status) for r in http_server.requests] == [(f"bytes={len(data)}-", 416)]


def test_download_existing_verified_file_is_not_fetched_again(http_server, tmp_path: Path) -> None:
    data = _payload()
    url = http_server.add_file("archive.zip", data)
    out = tmp_path / "archive.zip"
    out.write_bytes(data)
    assert download(url, out, sha256=_sha256(data), progress=False) == out
    assert http_server.requests == []


def test_download_without_checksum_reports_sha256(http_server, tmp_path: Path, capsys) -> None:
    data = _payload()
    url = http_server.add_file("archive.zip", data)
    out = tmp_path / "archive.zip"
    download(url, out, progress=False)
    assert out.read_bytes() == data
    assert f"sha256 {_sha256(data)}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive.zip"]


def test_download_http_404_fails_without_retrying(http_server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(http_server.url("missing.zip"), tmp_path / "x.zip", progress=False, backoff_s=0)
    assert len(http_server.requests) == 1


def test_download_file_url_and_local_path(tmp_path: Path) -> None:
    data = _payload(5000)
    source = tmp_path / "src" / "archive.zip"
    source.parent.mkdir()
    source.write_bytes(data)
    out1 = download(source.as_uri(), tmp_path / "a.zip", sha256=_sha256(data), progress=False)
    out2 = download(str(source), tmp_path / "b.zip", expected_size=len(data), progress=False)
    assert out1.read_bytes() == data and out2.read_bytes() == data
    with pytest.raises(FileNotFoundError, match="nothere.zip"):
        download(str(tmp_path / "nothere.zip"), tmp_path / "c.zip", progress=False)
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        download("ftp://example.org/a.zip", tmp_path / "d.zip", progress=False)


# ----------------------------------------------------------------------------------------- extract


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(zipfile.ZipInfo(name), content)
    return buffer.getvalue()


def test_safe_extract_zip_roundtrip(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip_bytes({"top/": b"", "top/a.txt": b"alpha", "top/sub/b.txt": b"beta"}))
    out = tmp_path / "raw"
    assert safe_extract(archive, out) == out
    assert (out / "top" / "a.txt").read_bytes() == b"alpha"
    assert (out / "top" / "sub" / "b.txt").read_bytes() == b"beta"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "bad_name",
    ["../evil.txt", "/abs/evil.txt", "C:/evil.txt", "ok/..\\..\\evil.txt", "ok/../../evil.txt"],
)
def test_safe_extract_refuses_escaping_zip_members(tmp_path: Path, bad_name: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "a.zip"
    # The bad member comes last: nothing, not even the good members before it, may be written.
    archive.write_bytes(_zip_bytes({"good.txt": b"fine", bad_name: b"evil"}))
    out = work / "raw"
    with pytest.raises(UnsafeArchiveError) as info:
        safe_extract(archive, out)
    assert str(archive) in str(info.value) and repr(bad_name) in str(info.value)
    assert sorted(p.name for p in work.iterdir()) == ["a.zip"]
    assert not list(tmp_path.rglob("evil.txt"))
    assert not Path("/abs/evil.txt").exists()


def _tar_bytes(add_members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        add_members(tf)
    return buffer.getvalue()


def _tar_add_file(tf: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tf.addfile(info, io.BytesIO(content))


def test_safe_extract_tar_and_refusal_of_links(tmp_path: Path) -> None:
    good = tmp_path / "good.tar.gz"
    good.write_bytes(_tar_bytes(lambda tf: _tar_add_file(tf, "top/a.txt", b"alpha")))
    assert (safe_extract(good, tmp_path / "good") / "top" / "a.txt").read_bytes() == b"alpha"

    def with_symlink(tf: tarfile.TarFile) -> None:
        _tar_add_file(tf, "top/a.txt", b"alpha")
        link = tarfile.TarInfo("top/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)

    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(_tar_bytes(with_symlink))
    with pytest.raises(UnsafeArchiveError, match="'top/link' \\(symbolic link\\)"):
        safe_extract(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

    escaping = tmp_path / "escaping.tar.gz"
    escaping.write_bytes(_tar_bytes(lambda tf: _tar_add_file(tf, "../evil.txt", b"evil")))
    with pytest.raises(UnsafeArchiveError, match="'..' component"):
        safe_extract(escaping, tmp_path / "escaping")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "escaping").exists()


def test_failed_extraction_keeps_previous_out_and_leaves_no_partial(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    payload = _payload(20_000)
    data = bytearray(_zip_bytes({"first.txt": b"first", "second.bin": payload}))
    # Corrupt the compressed body of the last member: the CRC check fails halfway through.
    data[-200] ^= 0xFF
    archive.write_bytes(bytes(data))
    out = tmp_path / "raw"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    with pytest.raises(ValueError, match=f"{archive}: corrupt archive .*{out} was not written"):
        safe_extract(archive, out)
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert _leftovers(tmp_path) == []


def test_safe_extract_rejects_non_archives(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a zip or tar archive"):
        safe_extract(path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_download_wrong_checksum_is_one_line_error(http_server, tmp_path: Path) -> None:
    url = http_server.add_file("archive.zip", _payload())
    out = tmp_path / "archive.zip"
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"))
    proc = subprocess.run(
        [sys.executable, "-m", "weakshot", "download", "--url", url, "--out", str(out), "--sha256", "0" * 64],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("error (download):") and "sha256 mismatch" in errors[0] and url in errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "archive.zip.part").exists()


def test_cli_extract_unsafe_archive_exits_1(tmp_path: Path, capsys) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip_bytes({"../evil.txt": b"evil"}))
    code = cli.main(["extract", "--archive", str(archive), "--out", str(tmp_path / "raw")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error (extract):") and "'../evil.txt'" in err
    assert not (tmp_path / "raw").exists()

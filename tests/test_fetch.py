"""`data fetch`: real HTTP on 127.0.0.1, hostile archives refused with nothing written outside --out."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import stat
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from visionautoml.cli import app
from visionautoml.data.fetch import MARKER, fetch, parse_size, read_marker
from visionautoml.errors import FetchError
from visionautoml.redact import public_url

FAST = {"backoff_s": 0.01, "timeout": 10.0}


def make_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def make_tar(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as bundle:
        for member in members:
            if isinstance(member, tuple):
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                bundle.addfile(info, io.BytesIO(member[1]))
            else:
                bundle.addfile(member)
    return buffer.getvalue()


DATASET = make_zip({"voc/annotations/a.xml": b"<annotation/>", "voc/images/a.jpg": b"\xff\xd8jpeg"})
DATASET_SHA = hashlib.sha256(DATASET).hexdigest()


class Server:
    """A real http.server whose next responses are scripted: (status, body) or 'truncate'."""

    def __init__(self) -> None:
        self.script: list[tuple[int, bytes] | str] = []
        self.default: tuple[int, bytes] = (200, DATASET)
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append({"path": self.path, **dict(self.headers)})
                action = server.script.pop(0) if server.script else server.default
                if action == "truncate":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(DATASET)))
                    self.end_headers()
                    self.wfile.write(DATASET[:10])
                    self.close_connection = True
                    return
                status, body = action
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def server() -> Iterator[Server]:
    instance = Server()
    thread = threading.Thread(target=instance.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield instance
    instance.httpd.shutdown()
    instance.httpd.server_close()
    thread.join(5)


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def test_http_fetch_retries_a_503_verifies_and_unpacks(server: Server, tmp_path: Path) -> None:
    server.script = [(503, b"busy")]
    out = fetch(f"{server.url}/raccoon.zip", tmp_path / "data", DATASET_SHA, **FAST)
    assert len(server.requests) == 2
    assert (out / "voc" / "images" / "a.jpg").read_bytes() == b"\xff\xd8jpeg"
    assert read_marker(out)["sha256"] == DATASET_SHA
    assert tree(tmp_path) == {"data", f"data/{MARKER}", "data/voc"} | {
        f"data/voc/{p}" for p in ("annotations", "annotations/a.xml", "images", "images/a.jpg")
    }


def test_second_fetch_of_the_same_verified_archive_does_no_work(server: Server, tmp_path: Path) -> None:
    out = fetch(f"{server.url}/raccoon.zip", tmp_path / "data", DATASET_SHA, **FAST)
    marker = read_marker(out)
    mtime = (out / "voc" / "images" / "a.jpg").stat().st_mtime_ns
    fetch(f"{server.url}/raccoon.zip", out, DATASET_SHA, **FAST)
    assert len(server.requests) == 1
    # Without --sha256 the file must be downloaded to be compared, but it is not unpacked again.
    fetch(f"{server.url}/raccoon.zip", out, **FAST)
    assert len(server.requests) == 2
    assert read_marker(out) == marker
    assert (out / "voc" / "images" / "a.jpg").stat().st_mtime_ns == mtime
    fetch(f"{server.url}/raccoon.zip", out, DATASET_SHA, force=True, **FAST)
    assert len(server.requests) == 3


def test_a_new_archive_replaces_an_earlier_fetch_whole(server: Server, tmp_path: Path) -> None:
    out = fetch(f"{server.url}/v1.zip", tmp_path / "data", **FAST)
    server.default = (200, make_zip({"other/b.txt": b"b"}))
    fetch(f"{server.url}/v2.zip", out, **FAST)
    assert tree(out) == {MARKER, "other", "other/b.txt"}


def test_truncated_download_is_retried(server: Server, tmp_path: Path) -> None:
    server.script = ["truncate"]
    out = fetch(f"{server.url}/raccoon.zip", tmp_path / "data", DATASET_SHA, **FAST)
    assert len(server.requests) == 2
    assert (out / "voc" / "annotations" / "a.xml").exists()


def test_persistent_503_gives_up_after_bounded_retries(server: Server, tmp_path: Path) -> None:
    server.default = (503, b"busy")
    with pytest.raises(FetchError, match=r"HTTP 503.*gave up after 3 attempts"):
        fetch(f"{server.url}/raccoon.zip", tmp_path / "data", retries=2, **FAST)
    assert len(server.requests) == 3
    assert tree(tmp_path) == set()


def test_404_is_not_retried_and_secrets_stay_out_of_the_message(server: Server, tmp_path: Path) -> None:
    server.default = (404, b"missing")
    url = f"http://alice:s3cret-pw@{server.url[7:]}/data.zip?sig=SAS-TOKEN-123"
    with pytest.raises(FetchError, match="HTTP 404") as caught:
        fetch(url, tmp_path / "data", **FAST)
    assert "s3cret-pw" not in str(caught.value) and "SAS-TOKEN-123" not in str(caught.value)
    assert len(server.requests) == 1
    assert server.requests[0]["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()
    assert "sig=SAS-TOKEN-123" in server.requests[0]["path"]
    assert public_url(url) == f"{server.url}/data.zip?…"


def test_checksum_mismatch_writes_nothing(server: Server, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=f"sha256 is {DATASET_SHA}, expected {'0' * 64}"):
        fetch(f"{server.url}/raccoon.zip", tmp_path / "data", "0" * 64, **FAST)
    assert tree(tmp_path) == set()


def refused(archive_bytes: bytes, tmp_path: Path, match: str, suffix: str = ".zip", **limits: int) -> None:
    """Fetch the archive from a sibling folder and check that nothing at all was written."""
    source = tmp_path / "src" / f"archive{suffix}"
    source.parent.mkdir()
    source.write_bytes(archive_bytes)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(FetchError, match=match):
        fetch(str(source), work / "out", **limits)
    assert tree(work) == set()
    assert tree(tmp_path) == {"src", "src/" + source.name, "work"}


def test_zip_slip_entry_is_refused(tmp_path: Path) -> None:
    archive = make_zip({"voc/ok.txt": b"fine", "../evil.txt": b"pwned"})
    refused(archive, tmp_path, r"'\.\./evil\.txt' escapes the target folder")
    assert not (tmp_path / "evil.txt").exists()


def test_absolute_paths_are_refused(tmp_path: Path) -> None:
    refused(make_zip({"/tmp/abs-evil.txt": b"x"}), tmp_path, "absolute path")


def test_absolute_tar_member_is_refused(tmp_path: Path) -> None:
    refused(make_tar([("/etc/evil", b"x")]), tmp_path, "absolute path", suffix=".tar.gz")


def test_zip_symlink_entry_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        link = zipfile.ZipInfo("voc/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(link, "/etc/passwd")
    refused(buffer.getvalue(), tmp_path, "'voc/link' is a symbolic link")


@pytest.mark.parametrize(
    ("kind", "what"),
    [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"), (tarfile.CHRTYPE, "device")],
)
def test_tar_links_and_devices_are_refused(tmp_path: Path, kind: bytes, what: str) -> None:
    member = tarfile.TarInfo("voc/special")
    member.type = kind
    member.linkname = "/etc/passwd"
    refused(make_tar([("voc/ok.txt", b"ok"), member]), tmp_path, what, suffix=".tar.gz")


def test_zip_bomb_by_ratio_is_refused(tmp_path: Path) -> None:
    bomb = make_zip({"zeros.bin": bytes(20 * 2**20)})
    assert len(bomb) < 100_000
    refused(bomb, tmp_path, r"possible decompression bomb.*--max-ratio")


def test_tar_gz_bomb_is_stopped_while_streaming(tmp_path: Path) -> None:
    bomb = make_tar([(f"zeros-{i}.bin", bytes(8 * 2**20)) for i in range(3)])
    refused(bomb, tmp_path, "possible decompression bomb", suffix=".tar.gz")


def test_zip_with_huge_declared_size_is_refused_before_unpacking(tmp_path: Path) -> None:
    archive = bytearray(make_zip({"big.bin": b"small"}))
    central = archive.index(b"PK\x01\x02")
    archive[central + 24 : central + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    refused(bytes(archive), tmp_path, r"declares more than 1,073,741,824 bytes.*--max-size", max_size=2**30)


def test_actual_size_over_the_limit_is_refused(tmp_path: Path) -> None:
    refused(make_tar([("a.bin", bytes(3000))], mode="w"), tmp_path, "unpacks to more", ".tar", max_size=2000)


def test_local_tar_and_file_url_and_plain_file(tmp_path: Path) -> None:
    archive = tmp_path / "voc.tar.xz"
    archive.write_bytes(make_tar([("voc/a.xml", b"<a/>")], mode="w:xz"))
    out = fetch(archive.as_uri(), tmp_path / "out")
    assert (out / "voc" / "a.xml").read_bytes() == b"<a/>"
    assert read_marker(out)["kind"] == "tar"
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"image_url": "images/a.jpg"}\n')
    assert (fetch(str(jsonl), tmp_path / "out2") / "train.jsonl").read_text() == jsonl.read_text()


def test_folder_is_copied_but_links_in_it_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "voc"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.jpg").write_bytes(b"jpeg")
    out = fetch(str(folder), tmp_path / "copy")
    assert (out / "images" / "a.jpg").read_bytes() == b"jpeg"
    (folder / "images" / "link.jpg").symlink_to(folder / "images" / "a.jpg")
    with pytest.raises(FetchError, match="symbolic link"):
        fetch(str(folder), tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists()
    with pytest.raises(FetchError, match="inside the source folder"):
        fetch(str(folder), folder / "nested")


def test_a_foreign_non_empty_out_folder_is_not_replaced(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(DATASET)
    project = tmp_path / "project"
    project.mkdir()
    (project / "precious.py").write_text("keep me")
    with pytest.raises(FetchError, match="not empty and was not written by `data fetch`"):
        fetch(str(archive), project)
    assert tree(project) == {"precious.py"}


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="not a sha256 hex digest"):
        fetch("x.zip", tmp_path / "o", "abc")
    with pytest.raises(FetchError, match="unsupported scheme 'ftp://'"):
        fetch("ftp://example.org/x.zip", tmp_path / "o")
    with pytest.raises(FetchError, match="no such file or folder"):
        fetch(str(tmp_path / "missing.zip"), tmp_path / "o")
    assert parse_size("10GiB") == 10 * 2**30 and parse_size("500MB") == 500_000_000
    with pytest.raises(FetchError, match="not understood"):
        parse_size("ten gigs")


def test_cli_refuses_zip_slip_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "evil.zip").write_bytes(make_zip({"ok.txt": b"ok", "../evil.txt": b"pwned"}))
    work = tmp_path / "work"
    work.mkdir()
    command = [
        str(Path(sys.executable).with_name("visionautoml")),
        "data",
        "fetch",
        str(tmp_path / "evil.zip"),
    ]
    result = subprocess.run(
        [*command, "--out", "out"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "escapes the target folder" in result.stderr and "Traceback" not in result.stderr
    assert tree(tmp_path) == {"evil.zip", "work"}


def test_cli_fetch_prints_the_result_and_a_repeat_is_a_no_op(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    good.write_bytes(DATASET)
    args = ["data", "fetch", str(good), "--out", str(tmp_path / "out")]
    first = CliRunner().invoke(app, args)
    second = CliRunner().invoke(app, [*args, "--sha256", DATASET_SHA])
    assert first.exit_code == 0 and "fetched" in first.stdout, first.output
    assert second.exit_code == 0 and "nothing to do" in second.stdout
    assert json.loads((tmp_path / "out" / MARKER).read_text())["sha256"] == DATASET_SHA


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("data.zip", DATASET[: len(DATASET) // 2]),
        ("renamed.bin", DATASET[:-30]),
        ("data.tar.gz", make_tar([("a.txt", __import__("random").Random(0).randbytes(50_000))])[:3000]),
        ("notes.json.gz", __import__("gzip").compress(b"{}" * 5000)[:-10]),
    ],
    ids=["zip", "zip by content", "tar.gz", "gz"],
)
def test_a_truncated_archive_is_an_error_not_a_plain_file(tmp_path: Path, name: str, data: bytes) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(FetchError, match="truncated or damaged"):
        fetch(str(tmp_path / name), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_truncated_zip_served_over_http_is_an_error(server: Server, tmp_path: Path) -> None:
    server.default = (200, DATASET[:-40])
    with pytest.raises(FetchError, match="zip archive that is truncated"):
        fetch(f"{server.url}/raccoon.zip", tmp_path / "data", **FAST)
    assert not (tmp_path / "data").exists()


def test_a_server_that_accepts_and_never_answers_fails_at_once_after_the_timeout(tmp_path: Path) -> None:
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def hold() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)  # never read from, never answered

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/data.zip"
        with pytest.raises(FetchError, match=r"no answer from the server within 0\.3 s.*--timeout"):
            fetch(url, tmp_path / "data", retries=3, backoff_s=0.01, timeout=0.3)
    finally:
        listener.close()
        thread.join(5)
        for connection in accepted:
            connection.close()
    assert len(accepted) == 1, "a server that never answers is not asked again"
    with pytest.raises(FetchError, match="positive number of seconds"):
        fetch(url, tmp_path / "data", timeout=0)


def test_sizes_are_parsed_by_pydantic_byte_size() -> None:
    assert parse_size("1.5 GB") == 1_500_000_000 and parse_size("2KiB") == 2048 and parse_size("123") == 123

"""Downloads retry, time out, and never leave a half or broken file behind (a local server on 127.0.0.1)."""

import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medqa import data
from medqa.errors import MedQAError
from tests.sample_data import write_sample_csv

XML = b"""<?xml version="1.0"?><Document id="1" source="GHR"><Focus>Gout</Focus><QAPairs>
<QAPair pid="1"><Question qid="1">What causes gout ?</Question><Answer>Uric acid crystals.</Answer></QAPair>
<QAPair pid="2"><Question qid="2">How is gout treated ?</Question><Answer>With medicines.</Answer></QAPair>
</QAPairs></Document>"""


def _zip_bytes(with_xml=True):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        if with_xml:
            z.writestr("MedQuAD-master/1_CancerGov_QA/0000001.xml", XML)
        z.writestr("MedQuAD-master/readme.txt", b"hello")
    return buf.getvalue()


# /stall.csv holds its answer until the test sets this, after the client timed out: no race against a clock.
STALL_RELEASE = threading.Event()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    csv_bytes = write_sample_csv(tmp_path_factory.mktemp("srv") / "m.csv").read_bytes()
    zip_bytes = _zip_bytes()
    hits = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_body(self, body, length=None):
            self.send_response(200)
            self.send_header("Content-Length", str(length if length is not None else len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the stall test's timeout)

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/ok.csv":
                self.send_body(csv_bytes)
            elif self.path == "/flaky.csv":  # fails twice, then works
                if hits[self.path] <= 2:
                    self.send_error(503)
                else:
                    self.send_body(csv_bytes)
            elif self.path == "/truncated.csv":  # promises more bytes than it sends
                self.send_body(csv_bytes[: len(csv_bytes) // 2], length=len(csv_bytes))
                self.close_connection = True
            elif self.path == "/stall.csv":  # accepts the connection and never answers in time
                STALL_RELEASE.wait(60)  # only a safety net: the test sets the event as soon as the client gave up
                self.send_body(csv_bytes)
            elif self.path == "/corrupt.csv":
                self.send_body(b"\x00\x01 this is no csv \xff\xfe")
            elif self.path == "/medquad.zip":
                self.send_body(zip_bytes)
            elif self.path == "/no-xml.zip":
                self.send_body(_zip_bytes(with_xml=False))
            elif self.path == "/truncated.zip":
                self.send_body(zip_bytes[:-40])
            else:
                self.send_error(404)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    STALL_RELEASE.set()
    srv.shutdown()


def get(base, name, dest, **kw):
    return data.download_url(f"{base}/{name}", dest, timeout=0.5, retries=kw.pop("retries", 3), backoff=0.01,
                             validate=data.read_table, **kw)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_good_download_lands_in_place(server, tmp_path):
    base, _ = server
    dest = get(base, "ok.csv", tmp_path / "medquad.csv")
    assert len(data.read_table(dest)) == 308 and leftovers(tmp_path) == ["medquad.csv"]


def test_server_errors_are_retried(server, tmp_path):
    base, hits = server
    get(base, "flaky.csv", tmp_path / "medquad.csv")
    assert hits["/flaky.csv"] == 3


@pytest.mark.parametrize("name,words", [("truncated.csv", "got"), ("stall.csv", "timed out"),
                                        ("corrupt.csv", "binary file"), ("missing.csv", "404")])
def test_failed_downloads_leave_nothing_and_keep_what_was_there(server, tmp_path, name, words):
    base, _ = server
    old = tmp_path / "keep.csv"
    old.write_text("old content")
    with pytest.raises(MedQAError, match=f"failed after 2 tries.*{words}"):
        get(base, name, tmp_path / "medquad.csv", retries=2)
    if name == "stall.csv":
        STALL_RELEASE.set()  # both tries gave up while the server still held its answer
    assert leftovers(tmp_path) == ["keep.csv"] and old.read_text() == "old content"


def test_github_release_is_downloaded_and_parsed(server, tmp_path):
    base, _ = server
    path = data.fetch_from_github(tmp_path, url=f"{base}/medquad.zip", timeout=1, retries=1, backoff=0)
    df = data.read_table(path)
    assert list(df["instruction"]) == ["What causes gout ?", "How is gout treated ?"]
    assert set(leftovers(tmp_path)) == {"medquad.csv", "MedQuAD-master.zip"}


def test_a_truncated_zip_is_never_kept(server, tmp_path):
    base, _ = server
    with pytest.raises(MedQAError):
        data.fetch_from_github(tmp_path, url=f"{base}/truncated.zip", timeout=1, retries=2, backoff=0)
    assert leftovers(tmp_path) == []


def test_a_zip_without_medquad_in_it_is_removed_with_a_clear_error(server, tmp_path):
    base, _ = server
    with pytest.raises(MedQAError, match="not a readable MedQuAD release.*downloads it again"):
        data.fetch_from_github(tmp_path, url=f"{base}/no-xml.zip", timeout=1, retries=1, backoff=0)
    assert leftovers(tmp_path) == []


def test_gdown_that_raises_or_writes_a_broken_file_leaves_nothing(tmp_path, monkeypatch):
    import gdown

    def raising(**kw):
        raise ConnectionError("Failed to retrieve folder contents")

    def broken(id, output, quiet):
        path = f"{output}/medquad.csv"
        with open(path, "w") as f:
            f.write("q,a\nhalf a file")
        return [path]

    for fake in (raising, broken):
        monkeypatch.setattr(gdown, "download_folder", fake)
        with pytest.raises(MedQAError, match="gdown failed after 2 tries"):
            data.fetch_from_gdrive(tmp_path, retries=2, backoff=0)
        assert leftovers(tmp_path) == []


def test_gdown_download_is_kept_when_it_reads(tmp_path, monkeypatch):
    import gdown

    def good(id, output, quiet):
        assert id == data.GDRIVE_FOLDER_ID
        return [str(write_sample_csv(f"{output}/MedQuAD.csv"))]

    monkeypatch.setattr(gdown, "download_folder", good)
    path = data.fetch_from_gdrive(tmp_path, retries=1)
    assert path == tmp_path / "medquad.csv" and leftovers(tmp_path) == ["medquad.csv"]

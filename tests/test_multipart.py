"""The WADO-RS multipart reader (:func:`pacs2bids.pacs.multipart._multipart_parts`), on bodies built
here byte by byte: every position a chunk boundary can fall at, truncated answers, and the
Content-Type forms servers send (PS3.18 8.7.3.5, RFC 2046 5.1)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from pacs2bids.pacs import multipart
from pacs2bids.pacs.multipart import _boundary, _multipart_parts
from pacs2bids.errors import PacsError

B = "3fe2a-Boundary"
# part bodies that look like the framing: a near-miss delimiter, blank lines, a dash pair
P1 = b"DICM\x00\x01\r\n--3fe2a-Bounda\r\n\r\n--\r\n" + bytes(range(40))
P2 = b"\r\n\r\nsecond \r\n-- part\r\n-" + bytes(range(255, 200, -1))
CT = f'multipart/related; type="application/dicom"; boundary={B}'


def body(*parts: bytes, close: bool = True) -> bytes:
    out = b"some preamble to ignore\r\n"
    for p in parts:
        out += f"--{B}\r\nContent-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n\r\n".encode()
        out += p + b"\r\n"
    return out + (f"--{B}--\r\nepilogue".encode() if close else b"")


class Answer:
    """Stands for a streamed ``requests.Response``: its Content-Type and the chunks it yields."""

    def __init__(self, chunks: list[bytes], content_type: str = CT):
        self.headers = {"Content-Type": content_type}
        self.chunks = chunks

    def iter_content(self, chunk_size):
        yield from (c for c in self.chunks if c)


def part_bytes(p) -> bytes:
    """A part's bytes: held in memory (no file), or in its temporary file."""
    return p.data if p.path is None else p.path.read_bytes()


def read(answer: Answer, folder: Path) -> list[bytes]:
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    parts = list(_multipart_parts(answer, folder))
    for p in parts:  # the checksum and size taken while writing are those of the file
        data = part_bytes(p)
        assert (p.sha256, p.size) == (hashlib.sha256(data).hexdigest(), len(data))
        # a part up to MEMORY_PART is held in memory, with no file; a larger one is a file, its head kept
        if len(data) <= multipart.MEMORY_PART:
            assert p.path is None and p.data == data
        else:
            assert p.data is None and p.head == data[:multipart.HEAD]
    assert sorted(folder.iterdir()) == sorted(p.path for p in parts if p.path is not None)  # no other file
    return [part_bytes(p) for p in parts]


@pytest.mark.parametrize("memory_part", [1 << 20, 0, len(P2) - 1, len(P1)])
def test_every_split_position_of_a_two_part_body(tmp_path, monkeypatch, memory_part):
    """Whether a part is held in memory (its bytes handed over with it), or too large for that
    (written as it streams) from its first byte or from some byte in the middle of a chunk, every
    split of the answer gives the same parts, files, checksums and heads."""
    monkeypatch.setattr(multipart, "MEMORY_PART", memory_part)
    data = body(P1, P2)
    for i in range(len(data) + 1):
        assert read(Answer([data[:i], data[i:]]), tmp_path / "in") == [P1, P2], f"split at byte {i}"
    for i in range(0, len(data) + 1, 7):  # and three chunks, the second one byte long
        assert read(Answer([data[:i], data[i:i + 1], data[i + 1:]]), tmp_path / "in") == [P1, P2]
    assert read(Answer([bytes([b]) for b in data]), tmp_path / "in") == [P1, P2]  # one byte at a time


def test_parts_are_whole_files_and_nothing_partial_is_left(tmp_path, monkeypatch):
    data = body(P1, P2)
    folder = tmp_path / "in"
    folder.mkdir()
    held = list(_multipart_parts(Answer([data]), folder))  # small parts: in memory, no file made for them
    assert [(p.path, p.data) for p in held] == [(None, P1), (None, P2)] and not list(folder.iterdir())
    monkeypatch.setattr(multipart, "MEMORY_PART", 0)  # too large to hold: each streamed to its own file
    paths = [p.path for p in _multipart_parts(Answer([data]), folder)]
    assert [p.read_bytes() for p in paths] == [P1, P2] and sorted(folder.iterdir()) == sorted(paths)


@pytest.mark.parametrize("memory_part", [1 << 20, 0])
@pytest.mark.parametrize("cut, whole_parts", [
    ("in_second_part", [P1]), ("after_delimiter", [P1]), ("before_close", [P1]), ("half_close", [P1, P2]),
    ("no_boundary", []),
])
def test_an_answer_without_its_closing_boundary_is_an_error(tmp_path, monkeypatch, cut, whole_parts, memory_part):
    monkeypatch.setattr(multipart, "MEMORY_PART", memory_part)
    whole = body(P1, P2)
    data = {
        "in_second_part": whole[: whole.index(P2) + 5],
        "after_delimiter": whole[: whole.index(f"--{B}".encode(), whole.index(P1)) + len(B) + 2],  # "--B", no more
        "before_close": body(P1, P2, close=False),
        "half_close": whole[: whole.rindex(b"--") + 1],
        "no_boundary": b"<html>gateway timeout</html>",
    }[cut]
    folder = tmp_path / "in"
    folder.mkdir()
    got, files = [], []
    with pytest.raises(PacsError, match="ended") as err:
        for p in _multipart_parts(Answer([data]), folder):
            got.append(part_bytes(p))
            files += [p.path.read_bytes()] if p.path is not None else []
    assert err.value.transient  # a retry may get it whole
    assert got == whole_parts  # what was whole before the cut
    assert sorted(p.read_bytes() for p in folder.iterdir()) == sorted(files)  # the cut instance is not left behind


@pytest.mark.parametrize("content_type, what", [
    ("application/json", "application/json, not multipart/related"),
    ("", "without Content-Type"),
    ("text/html; charset=utf-8", "text/html, not multipart/related"),
    ('multipart/related; type="application/dicom"', "without a boundary"),
    (f'multipart/related; type="application/dicom+json"; boundary={B}', "application/dicom+json parts"),
])
def test_a_wrong_content_type_is_a_clear_error(tmp_path, content_type, what):
    with pytest.raises(PacsError, match=what.replace("+", r"\+")) as err:
        read(Answer([body(P1)], content_type), tmp_path / "in")
    assert not err.value.transient


@pytest.mark.parametrize("content_type", [
    f'multipart/related; type="application/dicom"; boundary="{B}"',
    f'Multipart/Related; boundary="{B}"; type=application/dicom',
    f'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.70; boundary={B}',
    f'multipart/related;boundary={B};transfer-syntax="*";type="application/dicom"',
])
def test_boundary_parameter_forms(tmp_path, content_type):
    assert _boundary(content_type) == B.encode()
    assert read(Answer([body(P1, P2)], content_type), tmp_path / "in") == [P1, P2]


def test_quoted_boundary_with_characters_a_token_cannot_hold(tmp_path):
    global B
    old, B = B, "abc=def:ghi 12"  # '=', ':' and a space are bchars (RFC 2046 5.1.1), legal only when quoted
    try:
        ct = f'multipart/related; type="application/dicom"; boundary="{B}"'
        assert _boundary(ct) == B.encode()
        assert read(Answer([body(P1, P2)], ct), tmp_path / "in") == [P1, P2]
    finally:
        B = old


class Closable(Answer):
    """An answer that records being closed (what the reader's caller does to stop it)."""

    closed = False

    def close(self):
        self.closed = True


def test_parts_are_read_ahead_while_the_caller_files_them(tmp_path, monkeypatch):
    """While the caller holds the first part (filing it), the reader thread has already
    received and written the next ones: the transfer and the filing overlap. The parts come in
    order, whole, and a cut answer raises after the parts before the cut."""
    import threading
    import time

    from pacs2bids.pacs.multipart import _read_ahead

    monkeypatch.setattr(multipart, "MEMORY_PART", 0)  # each part in a file: what the reader did shows on disk

    parts = [bytes([i]) * (1000 + i) for i in range(5)]
    answer = Closable([body(*parts, close=False)])
    got, ahead = [], 0
    with pytest.raises(PacsError, match="closing boundary"):
        for part in _read_ahead(_multipart_parts(answer, tmp_path), answer):
            if not got:  # the first part: wait for the reader to write the others meanwhile
                deadline = time.monotonic() + 10
                while len(list(tmp_path.iterdir())) < 4 and time.monotonic() < deadline:
                    time.sleep(0.01)
                ahead = len(list(tmp_path.iterdir()))
            got.append(part.path.read_bytes())
            part.path.unlink()
    assert ahead >= 4 and got == parts[:4]  # the fifth was cut: not handed over, its file deleted
    assert not list(tmp_path.iterdir())
    assert not [t for t in threading.enumerate() if t.name == "wado-rs-reader"]


def test_what_is_read_ahead_is_bounded_in_bytes(monkeypatch):
    """The reader stops when the parts waiting hold the budget: 64 parts of 100 kB would be 6.4 MB
    ahead per answer (32 MB for CT slices of 512 kB); with a 300 kB budget, 3 wait and one more is
    read. A part larger than the budget still passes, alone, and every part comes in order."""
    import time

    from pacs2bids.pacs.multipart import Part, _read_ahead

    monkeypatch.setattr(multipart, "AHEAD_BYTES", 300_000, raising=False)
    sizes = [100_000] * 20 + [1_000_000] + [100_000] * 5
    made = []

    def parts():
        for i, n in enumerate(sizes):
            made.append(i)
            yield Part(path=None, streamed_sha256=None, size=n, data=bytes([i]) * n)

    got = []
    for part in _read_ahead(parts(), Closable([])):
        if not got:
            time.sleep(0.5)  # the caller is slow: the reader fills what it may meanwhile
            ahead = len(made)
        got.append(part.data)
    assert ahead <= 5, ahead  # the first, 3 waiting, 1 waiting for room (64 before the budget)
    assert got == [bytes([i]) * n for i, n in enumerate(sizes)]


def test_a_caller_stopping_early_leaves_no_file_and_no_reader(tmp_path, monkeypatch):
    import threading

    from pacs2bids.pacs.multipart import _read_ahead

    monkeypatch.setattr(multipart, "MEMORY_PART", 0)  # the parts read ahead are files: they must be deleted

    answer = Closable([body(*[bytes([i]) * 500 for i in range(6)])])
    with pytest.raises(RuntimeError):
        for part in _read_ahead(_multipart_parts(answer, tmp_path), answer, depth=2):
            part.path.unlink()
            raise RuntimeError("the caller failed")
    assert not list(tmp_path.iterdir())
    assert not [t for t in threading.enumerate() if t.name == "wado-rs-reader"]


def body_with_lengths(lengths: list[int | str], *parts: bytes) -> bytes:
    out = b"preamble\r\n"
    for n, p in zip(lengths, parts):
        out += f"--{B}\r\nContent-Type: application/dicom\r\nContent-length: {n}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{B}--\r\n".encode()


@pytest.mark.parametrize("lengths", [[len(P1), len(P2)], [len(P1) - 1, len(P2) + 1], [0, 10 ** 6], ["x", " 7 "],
                                     [len(P1) + len(P2), 1]])
def test_a_parts_content_length_is_used_only_where_its_delimiter_is(tmp_path, lengths):
    """Orthanc declares each part's Content-Length: the reader jumps to the delimiter there
    instead of searching the part's bytes for it. A length that does not land on a delimiter
    (wrong, malformed, beyond the bytes at hand) is not trusted: the bytes are searched, and
    every split of the answer gives the same parts."""
    data = body_with_lengths(lengths, P1, P2)
    for i in range(len(data) + 1):
        assert read(Answer([data[:i], data[i:]]), tmp_path / "in") == [P1, P2], f"split at byte {i}"


def test_a_declared_length_spares_the_search_of_the_part(tmp_path):
    """With the right Content-Length and the part at hand, its bytes are not searched for the
    delimiter; with a wrong one they are."""
    big = b"x" * 100_000
    searched = []

    class Bytes(bytes):
        def find(self, sub, *args):
            searched.append(sub)
            return super().find(sub, *args)

    class Once(Answer):
        def iter_content(self, chunk_size):
            yield Bytes(self.chunks[0])

    delim = f"\r\n--{B}".encode()
    assert read(Once([body_with_lengths([len(big), len(P2)], big, P2)]), tmp_path / "in") == [big, P2]
    assert delim not in searched
    assert read(Once([body_with_lengths([len(big) - 1, len(P2)], big, P2)]), tmp_path / "in") == [big, P2]
    assert searched.count(delim) == 1


def test_a_part_held_in_memory_is_hashed_by_the_thread_that_files_it(tmp_path, monkeypatch):
    """The reader thread (receiving and splitting the answer) does not hash a part held in
    memory; the caller's thread does, once, when it asks. A part streamed to its file (larger
    than MEMORY_PART) is still hashed as it is written."""
    hashed_in: list[str] = []
    real = hashlib.sha256

    def spy(*args):
        hashed_in.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(multipart.hashlib, "sha256", spy)
    answer = Answer([body(P1, P2)])
    folder = tmp_path / "in"
    folder.mkdir()
    parts = list(multipart._read_ahead(_multipart_parts(answer, folder), answer))
    assert all(p.data is not None for p in parts) and hashed_in == []  # the reader hashed nothing
    assert [p.sha256 for p in parts] == [real(P1).hexdigest(), real(P2).hexdigest()]
    assert [p.sha256 for p in parts] and hashed_in == [threading.current_thread().name] * 2  # once each
    monkeypatch.setattr(multipart, "MEMORY_PART", 0)
    streamed = list(_multipart_parts(Answer([body(P1, P2)]), tmp_path / "in"))
    hashed_in.clear()
    assert [p.sha256 for p in streamed] == [real(P1).hexdigest(), real(P2).hexdigest()] and hashed_in == []


def test_a_large_part_streams_to_its_file_without_copies_of_the_chunks(tmp_path, monkeypatch):
    """Each chunk is written from a view of itself: not copied after the few bytes left over from the
    chunk before (a suffix of it can begin the delimiter only if it starts with its CR), nor sliced
    into a copy per part piece. Measured by what Python allocates while the answer is split."""
    import tracemalloc

    monkeypatch.setattr(multipart, "MEMORY_PART", 0)  # streamed: nothing held
    size, chunk = 16 << 20, 4 << 20
    payload = bytes(range(256)) * (size // 256)  # no CR LF "--" boundary in it; CRs at every chunk's end
    data = body(payload)
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    folder = tmp_path / "in"
    folder.mkdir()
    tracemalloc.start()
    try:
        parts = list(_multipart_parts(Answer(chunks), folder))
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [p.path.read_bytes() == payload for p in parts] == [True]
    assert peak < chunk // 4, f"{peak} bytes allocated while splitting {len(chunks)} chunks of {chunk}"

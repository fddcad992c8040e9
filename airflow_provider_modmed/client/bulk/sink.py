"""The verifying NDJSON writer: :class:`NdjsonSink` streams one bulk file's decoded body into storage,
checking every line as it passes, hashing the bytes, and renaming the file into place only when it is
complete and verified; :class:`FileRecord` is what it answers (the file's checkpoint)."""

from __future__ import annotations

import codecs
import contextlib
import functools
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow_provider_modmed.client.bulk.errors import VerificationError
from airflow_provider_modmed.client.bulk.manifest import ManifestItem
from airflow_provider_modmed.errors import issues_from_body

try:  # a hard dependency of Airflow (task SDK); the client works without it, only slower
    import msgspec
except ImportError:  # pragma: no cover
    msgspec = None  # type: ignore[assignment]

log = logging.getLogger("airflow_provider_modmed.client.bulk")

#: the longest accepted NDJSON line (memory bound), by default
MAX_LINE_BYTES = 64 * 1024 * 1024
#: the body is gathered into blocks of this many bytes before it is written, hashed, decoded and checked:
#: some servers send one HTTP chunk per resource (~700 bytes), and every step costs per call, not per byte
BLOCK_BYTES = 256 * 1024


if msgspec is not None:
    class _Head(msgspec.Struct):
        resourceType: str

    _HEAD_DECODER: Any = msgspec.json.Decoder(_Head)

    def _resource_type(line: bytes) -> Any:
        """The line's ``resourceType``; the whole line is validated as JSON, only one field is built."""
        try:
            return _HEAD_DECODER.decode(line).resourceType
        except msgspec.ValidationError:
            return None  # valid JSON, but no object with a string resourceType
        except msgspec.DecodeError:
            raise ValueError("not JSON") from None

    @functools.lru_cache(maxsize=256)
    def _lines_decoder(resource_type: str) -> Any:
        """Validates a block of NDJSON lines in C: each one JSON, an object, ``resourceType`` = the type."""
        head = msgspec.defstruct(f"{resource_type}Line", [("resourceType", Literal[resource_type])], gc=False)
        return msgspec.json.Decoder(head)

    def _count_lines(block: Any, resource_type: str) -> int | None:
        """Lines in ``block`` (complete lines, blank ones skipped) if all are valid; None if one is not."""
        try:
            return len(_lines_decoder(resource_type).decode_lines(block))
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
else:  # pragma: no cover
    def _resource_type(line: bytes) -> Any:
        obj = json.loads(line)
        return obj.get("resourceType") if isinstance(obj, dict) else None

    def _count_lines(block: Any, resource_type: str) -> int | None:
        return None


def replace_file(src: Any, dst: Any) -> None:
    """Rename ``src`` over ``dst`` (pathlib.Path, ObjectStoragePath/UPath)."""
    if hasattr(src, "replace"):
        src.replace(dst)
    else:  # pragma: no cover
        if dst.exists():
            dst.unlink()
        src.rename(dst)



@dataclass(frozen=True)
class FileRecord:
    """A stored, verified file: its checkpoint."""

    name: str
    section: str
    type: str
    source: str
    lines: int
    bytes: int
    sha256: str
    #: error files only: issues counted by ``severity/code``
    issues: dict[str, int] = field(default_factory=dict)


class NdjsonSink:
    """Streams one bulk file into storage: writes ``<name>.part``, checks every line as it passes (JSON,
    ``resourceType`` = the item's type; error files also tallied by severity and code), hashes the bytes,
    and on :meth:`commit` renames to the final name. Network chunks are gathered into blocks of
    ``block_bytes`` first (:data:`BLOCK_BYTES`), so tiny chunks cost what large ones do.
    Memory: one block plus one partial line."""

    def __init__(self, folder: Any, item: ManifestItem, max_line_bytes: int = MAX_LINE_BYTES,
                 block_bytes: int = BLOCK_BYTES):
        self.item = item
        self.target = folder / item.name
        self.part = folder / f"{item.name}.part"
        self.max_line_bytes = max_line_bytes
        # a line longer than the bound is refused as soon as it is gathered, not a block later
        self.block_bytes = max(1, min(block_bytes, max_line_bytes + 1))
        self._fh: Any = None
        self._reset()

    def _reset(self) -> None:
        self._gathered: list[bytes] = []  # chunks not processed yet (less than one block)
        self._gathered_len = 0
        self._parts: list[bytes | memoryview] = []  # the current, incomplete line
        self._pending_len = 0
        self._hash = hashlib.sha256()
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self.lines = 0
        self.bytes = 0
        #: blocks processed (each one write, one hash update, one decode, one line check)
        self.blocks = 0
        #: after a complete transfer: (lines, count) when they differ on a verified file
        self.miscount: tuple[int, int] | None = None
        self.issues: Counter[str] = Counter()

    def open(self) -> None:
        self._reset()
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.part.open("wb")

    def write(self, chunk: bytes) -> None:
        """Take the next piece of the body (any size); raises :class:`VerificationError`. Pieces are
        gathered until they make a block of ``block_bytes``, then processed together."""
        if not chunk:
            return
        self._gathered.append(chunk)
        self._gathered_len += len(chunk)
        if self._gathered_len >= self.block_bytes:
            self._flush()

    def _flush(self) -> None:
        gathered = self._gathered
        if not gathered:
            return
        block = gathered[0] if len(gathered) == 1 else b"".join(gathered)
        self._gathered, self._gathered_len = [], 0
        self.blocks += 1
        self._take(block)

    def _take(self, chunk: bytes) -> None:
        """One block: write, hash, decode and check its complete lines; keep its last partial line."""
        self._fh.write(chunk)
        self._hash.update(chunk)
        self.bytes += len(chunk)
        try:
            self._utf8.decode(chunk)
        except UnicodeDecodeError:
            raise self._bad(f"is not UTF-8 near byte {self.bytes}") from None
        first = chunk.find(b"\n")
        if first < 0:  # still inside one line
            self._parts.append(chunk)
            self._pending_len += len(chunk)
        else:
            view = memoryview(chunk)
            start = 0
            if self._parts:  # the line that straddles chunks
                self._parts.append(view[:first + 1])
                self._block(b"".join(self._parts))
                start = first + 1
            last = chunk.rfind(b"\n")
            if last >= start:
                self._block(view[start:last + 1])  # complete lines, not copied
            tail = chunk[last + 1:]
            self._parts = [tail] if tail else []
            self._pending_len = len(tail)
        if self._pending_len > self.max_line_bytes:
            raise self._bad(f"has a line longer than {self.max_line_bytes} bytes")

    def _block(self, block: bytes | memoryview) -> None:
        """Complete lines: checked in one C call; line by line only for error files (their issues are
        tallied) and to say which line is wrong."""
        if self.item.section != "error":
            count = _count_lines(block, self.item.type)
            if count is not None:
                self.lines += count
                return
        for raw in bytes(block).split(b"\n"):
            self._line(raw)

    def close(self) -> None:
        """End of body: check the last line and the count; the ``.part`` file is complete.

        A count that differs on an output or deleted file fails (:attr:`miscount` says so: the transfer
        was complete, so fetching the same bytes again cannot fix it); on an error file it is a warning."""
        self._flush()
        try:
            self._utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            raise self._bad("ends inside a UTF-8 sequence") from None
        if self._parts:
            self._line(b"".join(self._parts))
            self._parts, self._pending_len = [], 0
        self._fh.close()
        self._fh = None
        expected = self.item.expected_lines
        if expected is not None and self.lines != expected:
            self.miscount = (self.lines, expected)
            raise self._bad(f"has {self.lines} resources but the manifest says {expected}")
        if self.item.section == "error" and self.item.count is not None and self.lines != self.item.count:
            log.warning("modmed: bulk error file %s holds %d OperationOutcome line(s) but its manifest entry says "
                        "count %d; kept as it is (error files are reports; error_policy decides)", self.item.name,
                        self.lines, self.item.count)

    def abort(self) -> None:
        """Drop the partial file (a retry starts over: the IG has no range requests)."""
        self._gathered, self._gathered_len = [], 0
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        with contextlib.suppress(OSError):
            self.part.unlink(missing_ok=True)

    def commit(self) -> FileRecord:
        """Rename ``.part`` to the final name; answer the record to checkpoint."""
        replace_file(self.part, self.target)
        return FileRecord(self.item.name, self.item.section, self.item.type, self.item.source, self.lines,
                          self.bytes, self._hash.hexdigest(), dict(self.issues))

    def _line(self, raw: bytes) -> None:
        raw = raw.strip()
        if not raw:
            return
        number = self.lines + 1
        try:
            rtype = _resource_type(raw)
        except ValueError:
            raise self._bad(f"line {number} is not JSON") from None
        if rtype != self.item.type:
            got = repr(rtype[:64]) if isinstance(rtype, str) else "no resourceType"
            raise self._bad(f"line {number} is {got}, expected {self.item.type!r}")
        self.lines = number
        if self.item.section == "error":
            for issue in issues_from_body(json.loads(raw)):
                self.issues[issue.label] += 1

    def _bad(self, what: str) -> VerificationError:
        return VerificationError(f"bulk file {self.item.name} {what}")

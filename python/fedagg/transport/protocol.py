"""fedagg's wire protocol over ZeroMQ (docs/protocol.md describes it for other languages).

Every message is exactly two frames: a fixed 64-byte header and one payload
frame (possibly empty). The header, little-endian:

    offset size  field
     0     4     magic     b"FAGW"
     4     1     version   2 (2: STATE lists the shards; a version 1 message is refused, answered in version 1)
     5     1     kind      Kind below
     6     1     dtype     0 none, 1 float32, 2 uint32 (a secure round's masked input)
     7     1     codec     0 raw, 1 a fedagg.compress payload (FAGP frames, length-prefixed)
     8     4     length    payload bytes (== the payload frame's size)
    12     4     aux       per kind: credits granted, chunk count asked, ...
    16     8     round     the round the message belongs to
    24     8     seq       the sender's message number, strictly increasing (replays are refused)
    32     8     offset    byte offset of the payload within the update or model
    40     8     total     bytes of the whole update or model
    48     4     checksum  CRC32C of the payload
    52     4     reserved  0
    56     8     session   the server's session id (a restarted server has another)

Parsing never trusts a field before checking it; anything off raises
ProtocolError, and the server answers it (or drops it) without touching state.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

from .. import _core, _json

MAGIC = b"FAGW"
VERSION = 2
HEADER = struct.Struct("<4sBBBBIIQQQQIIQ")
assert HEADER.size == 64
MAX_JSON = 1 << 16  # control messages carry small JSON payloads
DEFAULT_CHUNK = 4 << 20  # bytes per update / model chunk


class Kind(enum.IntEnum):
    # participant -> server
    HELLO = 1  # JSON {"id": str}: join or resume; answered by STATE
    GET_MODEL = 2  # offset = first byte, aux = chunks wanted; answered by MODEL chunks
    CHUNK = 3  # a slice of the update of `round` at `offset` (total = its size)
    COMMIT = 4  # the update of `round` is complete (total = its size in bytes)
    HEARTBEAT = 5  # alive, training
    STATUS = 6  # answered by STATE
    SECAGG = 7  # a secure round's step (aux = Step): its payload, answered by SECAGG_REPLY once the step opens
    # server -> participant
    STATE = 10  # JSON: round, phase, model size, chunk size, credits, bytes of this participant's update held
    MODEL = 11  # a slice of the global model of `round`
    CREDIT = 12  # aux more chunks may be sent; offset = bytes of the update held so far
    ACCEPTED = 13  # JSON {"round", "id"}: the update is in this round (and on disk)
    REJECTED = 14  # JSON {"reason", "detail"}: this message or update was refused
    ROUND = 15  # JSON: a new round started (the model of `round` is ready)
    SECAGG_REPLY = 16  # the answer to SECAGG step aux: the group, roster, inbox or unmask request


class Dtype(enum.IntEnum):
    NONE = 0
    FLOAT32 = 1
    UINT32 = 2  # a secure round's masked input: elements of the ring Z_2^bits


class Codec(enum.IntEnum):
    RAW = 0
    FAGP = 1


_KINDS = {int(k): k for k in Kind}  # header bytes -> enum members: a dict lookup, not Enum.__call__
_DTYPES = {int(k): k for k in Dtype}
_CODECS = {int(k): k for k in Codec}


class ProtocolError(ValueError):
    """A message that is malformed, inconsistent or not ours: never reaches the state."""


class VersionError(ProtocolError):
    """A fedagg message of another protocol version (`version`): refused in that version's words."""

    def __init__(self, version: int):
        super().__init__(f"protocol version {version} is not supported: this server speaks version {VERSION} "
                         "(its STATE lists the shards each coordinate range goes to; see docs/protocol.md); "
                         "upgrade the client")
        self.version = version


class Header(NamedTuple):  # a named tuple: made for every message, 4x cheaper than a frozen dataclass
    kind: Kind
    round: int = 0
    seq: int = 0
    offset: int = 0
    total: int = 0
    length: int = 0
    aux: int = 0
    checksum: int = 0
    session: int = 0
    dtype: Dtype = Dtype.NONE
    codec: Codec = Codec.RAW
    version: int = VERSION

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.kind, self.dtype, self.codec, self.length,
                           self.aux, self.round, self.seq, self.offset, self.total, self.checksum, 0, self.session)


def endpoint_host(endpoint: str) -> str:
    """The host of a ZeroMQ endpoint: "tcp://[::1]:5555" -> "::1" (a ":" in it means IPv6)."""
    return endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def message(kind: Kind, payload: Any = b"", checksum: Optional[int] = None, **fields) -> List[Any]:
    """[header, payload] with length and checksum filled in (the payload is not copied).

    `checksum`: the payload's CRC32C when the caller has it already (a model chunk sent many times)."""
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    n = view.nbytes if isinstance(view, memoryview) else len(view)
    h = Header(kind, length=n, checksum=_core.crc32c(view) if checksum is None else checksum, **fields)
    return [h.pack(), view]


def json_message(kind: Kind, obj: Any, **fields) -> List[Any]:
    return message(kind, json.dumps(obj, separators=(",", ":"), sort_keys=True).encode(), **fields)


def parse(frames: Sequence[Any], max_payload: int, *, verify: bool = True) -> Tuple[Header, memoryview]:
    """Check and decode [header, payload]; raises ProtocolError.

    verify=False leaves the checksum to the caller (the server checks CHUNK
    payloads while copying them: one pass over the bytes instead of two).
    """
    if len(frames) != 2:
        raise ProtocolError(f"a message is exactly 2 frames, got {len(frames)}")
    head = memoryview(frames[0]).cast("B")
    body = memoryview(frames[1]).cast("B")
    if head.nbytes != HEADER.size:
        raise ProtocolError(f"header must be {HEADER.size} bytes, got {head.nbytes}")
    (magic, version, kind, dtype, codec, length, aux, rnd, seq, offset, total, checksum, reserved,
     session) = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a fedagg message")
    if version != VERSION:
        raise VersionError(version)
    kind, dtype, codec = _KINDS.get(kind, kind), _DTYPES.get(dtype, dtype), _CODECS.get(codec, codec)
    if type(kind) is int or type(dtype) is int or type(codec) is int:
        raise ProtocolError(f"unknown field value: kind {kind}, dtype {dtype}, codec {codec}")
    if reserved != 0:
        raise ProtocolError("reserved header bytes must be 0")
    if length != body.nbytes:
        raise ProtocolError(f"header says {length} payload bytes, the frame has {body.nbytes}")
    if length > max_payload:
        raise ProtocolError(f"payload of {length} bytes exceeds the limit of {max_payload}")
    if offset + length > total and kind in (Kind.CHUNK, Kind.MODEL):
        raise ProtocolError(f"slice [{offset}, {offset + length}) runs past the total of {total} bytes")
    if verify and _core.crc32c(body) != checksum:
        raise ProtocolError("checksum mismatch")
    return Header(kind, rnd, seq, offset, total, length, aux, checksum, session, dtype, codec), body


def parse_json(body: memoryview) -> Any:
    try:
        return _json.loads(bytes(body), MAX_JSON)
    except _json.UntrustedJSONError as e:
        raise ProtocolError(f"control payload is not acceptable JSON: {e}") from None


def pack_frames(frames: Sequence[Any]) -> bytes:
    """A compressed payload's frames as one blob: u32 count, u64 sizes, then the frames."""
    views = [memoryview(f).cast("B") for f in frames]
    head = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
    return b"".join([head, *views])


def unpack_frames(blob: memoryview, max_frames: int = 64) -> List[memoryview]:
    """The inverse of pack_frames, as views into blob; raises ProtocolError."""
    blob = memoryview(blob).cast("B")
    if blob.nbytes < 4:
        raise ProtocolError("compressed blob truncated")
    (count,) = struct.unpack_from("<I", blob)
    if not 1 <= count <= max_frames or blob.nbytes < 4 + 8 * count:
        raise ProtocolError(f"compressed blob declares {count} frames")
    sizes = struct.unpack_from(f"<{count}Q", blob, 4)
    pos, out = 4 + 8 * count, []
    for s in sizes:
        if s > blob.nbytes - pos:
            raise ProtocolError("compressed blob frame runs past its end")
        out.append(blob[pos:pos + s])
        pos += s
    if pos != blob.nbytes:
        raise ProtocolError("compressed blob has trailing bytes")
    return out

"""Check Concrete's wire format (Cap'n Proto) before anything native reads it.

Evaluation keys and ciphertexts reach the server as Concrete's serialization: a Cap'n Proto
message of the ``concrete-protocol`` schema (``ServerKeyset`` for keys, ``Value`` for a
ciphertext). Concrete trusts the parameters written in these messages: a bootstrap key whose
``(glweDimension, polynomialSize)`` were changed while keeping its byte size aborts the process
inside Concrete. This module reads the messages in pure Python, with bounds checks on every
pointer, and compares every key's and ciphertext's description with the circuit's client
specification (``client.specs.json``), field by field, before Concrete sees them.

`check_evaluation_keys(data, specs)` and `check_ciphertext(data, gate, field)` raise
`WireFormatError` (a `ValueError`) naming what differs; they return nothing when the message
matches. A message must fill its bytes exactly: trailing bytes are an error.
"""

from __future__ import annotations

import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

MAX_SEGMENTS = 512
KEY_TYPES = ("binary", "ternary")
COMPRESSIONS = ("none", "seed", "paillier")


class WireFormatError(ValueError):
    """A serialized key or ciphertext is malformed or does not match the circuit."""


@dataclass(frozen=True)
class _Struct:
    message: "_Message"
    segment: int
    data_word: int  # first word of the data section in the segment
    data_words: int
    pointer_words: int

    def _data(self, offset: int, size: int) -> bytes:
        if offset + size > self.data_words * 8:
            return b"\0" * size  # fields beyond a (shorter, older) struct read as zero
        start = self.data_word * 8 + offset
        return bytes(self.message.segments[self.segment][start : start + size])

    def u32(self, offset: int) -> int:
        return struct.unpack("<I", self._data(offset, 4))[0]

    def u16(self, offset: int) -> int:
        return struct.unpack("<H", self._data(offset, 2))[0]

    def f64(self, offset: int) -> float:
        return struct.unpack("<d", self._data(offset, 8))[0]

    def bit(self, bit_offset: int) -> bool:
        return bool(self._data(bit_offset // 8, 1)[0] >> (bit_offset % 8) & 1)

    def pointer_word(self, index: int) -> Optional[int]:
        """Word index (in this segment) of pointer `index`, None when the struct has fewer."""
        return self.data_word + self.data_words + index if index < self.pointer_words else None

    def struct(self, index: int, what: str) -> "_Struct":
        word = self.pointer_word(index)
        if word is None:
            raise WireFormatError(f"{what}: missing")
        return self.message.read_struct(self.segment, word, what)

    def list(self, index: int, what: str) -> "_List":
        word = self.pointer_word(index)
        if word is None:
            return _List(self.message, 0, 0, 0, 0, 0, 0)
        return self.message.read_list(self.segment, word, what)


@dataclass(frozen=True)
class _List:
    message: "_Message"
    segment: int
    first_word: int  # composite: the first element; else the first byte // 8
    element_size: int  # capnp size code (2 byte, 4 four bytes, 6 pointer, 7 composite)
    count: int
    data_words: int  # composite elements only
    pointer_words: int

    def structs(self, what: str) -> List[_Struct]:
        if self.count == 0:
            return []
        if self.element_size != 7:
            raise WireFormatError(f"{what}: expected a list of structs")
        stride = self.data_words + self.pointer_words
        return [
            _Struct(
                self.message, self.segment, self.first_word + i * stride, self.data_words, self.pointer_words
            )
            for i in range(self.count)
        ]

    def u32s(self, what: str) -> List[int]:
        if self.count and self.element_size != 4:
            raise WireFormatError(f"{what}: expected a list of 32-bit integers")
        start = self.first_word * 8
        raw = bytes(self.message.segments[self.segment][start : start + 4 * self.count])
        return list(struct.unpack(f"<{self.count}I", raw))

    def byte_count(self, what: str) -> int:
        if self.count and self.element_size != 2:
            raise WireFormatError(f"{what}: expected bytes")
        return self.count

    def pointers(self) -> List[int]:
        """Word indexes of the pointers of a list of pointers (e.g. ``List(Data)``)."""
        if self.count and self.element_size != 6:
            raise WireFormatError("expected a list of pointers")
        return [self.first_word + i for i in range(self.count)]


class _Message:
    """A Cap'n Proto message (stream framing), read with bounds checks on every pointer."""

    def __init__(self, data: bytes, what: str):
        self.what = what
        view = memoryview(data)
        if len(view) < 8:
            raise WireFormatError(f"{what}: {len(view)} bytes is too short for a Concrete message")
        count = struct.unpack_from("<I", view, 0)[0] + 1
        if count > MAX_SEGMENTS:
            raise WireFormatError(f"{what}: {count} segments (at most {MAX_SEGMENTS})")
        header = 4 + 4 * count
        header += header % 8
        if len(view) < header:
            raise WireFormatError(f"{what}: truncated segment table")
        sizes = struct.unpack_from(f"<{count}I", view, 4)
        total = header + 8 * sum(sizes)
        if total != len(view):
            problem = "trailing bytes after" if total < len(view) else "truncated"
            raise WireFormatError(
                f"{what}: {problem} the message ({len(view)} bytes, the message "
                f"declares {total}): send the exact bytes Concrete serialized"
            )
        self.segments = []
        offset = header
        for size in sizes:
            self.segments.append(view[offset : offset + 8 * size])
            offset += 8 * size

    def word(self, segment: int, index: int) -> int:
        words = len(self.segments[segment]) // 8
        if not 0 <= index < words:
            raise WireFormatError(f"{self.what}: a pointer leads outside its segment")
        return struct.unpack_from("<Q", self.segments[segment], index * 8)[0]

    def root(self) -> _Struct:
        return self.read_struct(0, 0, "root")

    def _resolve(self, segment: int, word_index: int) -> Tuple[int, int, int]:
        """(segment, pointer value, target word) of the pointer at `word_index`, following far pointers."""
        pointer = self.word(segment, word_index)
        if pointer & 3 != 2:
            offset = _signed30(pointer >> 2 & 0x3FFFFFFF)
            return segment, pointer, word_index + 1 + offset
        target_segment = pointer >> 32
        if target_segment >= len(self.segments):
            raise WireFormatError(f"{self.what}: a far pointer names a missing segment")
        pad = pointer >> 3 & 0x1FFFFFFF
        if not pointer >> 2 & 1:  # single far: the landing pad is an ordinary pointer
            landing = self.word(target_segment, pad)
            if landing & 3 == 2:
                raise WireFormatError(f"{self.what}: a far pointer lands on another far pointer")
            return target_segment, landing, pad + 1 + _signed30(landing >> 2 & 0x3FFFFFFF)
        far = self.word(target_segment, pad)  # double far: far pointer to the content + a tag word
        tag = self.word(target_segment, pad + 1)
        content_segment = far >> 32
        if far & 3 != 2 or far >> 2 & 1 or content_segment >= len(self.segments):
            raise WireFormatError(f"{self.what}: malformed double-far pointer")
        return content_segment, tag, far >> 3 & 0x1FFFFFFF

    def read_struct(self, segment: int, word_index: int, what: str) -> _Struct:
        segment, pointer, target = self._resolve(segment, word_index)
        if pointer == 0:
            raise WireFormatError(f"{self.what}: {what} is missing")
        if pointer & 3 != 0:
            raise WireFormatError(f"{self.what}: {what} should be a struct")
        data_words, pointer_words = pointer >> 32 & 0xFFFF, pointer >> 48
        self._check_range(segment, target, data_words + pointer_words, what)
        return _Struct(self, segment, target, data_words, pointer_words)

    def read_list(self, segment: int, word_index: int, what: str) -> _List:
        segment, pointer, target = self._resolve(segment, word_index)
        if pointer == 0:
            return _List(self, segment, 0, 0, 0, 0, 0)
        if pointer & 3 != 1:
            raise WireFormatError(f"{self.what}: {what} should be a list")
        size_code, count = pointer >> 32 & 7, pointer >> 35
        if size_code == 7:
            self._check_range(segment, target, 1 + count, what)
            tag = self.word(segment, target)
            elements = _signed30(tag >> 2 & 0x3FFFFFFF)
            data_words, pointer_words = tag >> 32 & 0xFFFF, tag >> 48
            if tag & 3 != 0 or elements < 0 or elements * (data_words + pointer_words) > count:
                raise WireFormatError(f"{self.what}: {what} has a malformed list tag")
            return _List(self, segment, target + 1, 7, elements, data_words, pointer_words)
        bits = {0: 0, 1: 1, 2: 8, 3: 16, 4: 32, 5: 64, 6: 64}[size_code]
        self._check_range(segment, target, (count * bits + 63) // 64, what)
        return _List(self, segment, target, size_code, count, 0, 0)

    def _check_range(self, segment: int, start: int, words: int, what: str) -> None:
        if start < 0 or start + words > len(self.segments[segment]) // 8:
            raise WireFormatError(f"{self.what}: {what} points outside the message")


def _signed30(value: int) -> int:
    return value - (1 << 30) if value & (1 << 29) else value


# ---- the concrete-protocol structs the server checks (field byte offsets of the schema) ---------


def _modulus(s: _Struct) -> Dict[str, Any]:
    kind = s.u16(0)
    if kind == 0:
        return {"modulus": {"native": {}}}
    member = s.struct(0, "modulus")
    name = {1: "power", 2: "modulus"}.get(kind)
    if name is None:
        raise WireFormatError(f"unknown modulus kind {kind}")
    return {"modulus": {("powerOfTwo" if kind == 1 else "integer"): {name: member.u32(0)}}}


def _enum(values: Sequence[str], index: int, what: str) -> str:
    if index >= len(values):
        raise WireFormatError(f"{what}: unknown value {index}")
    return values[index]


def _bootstrap_params(s: _Struct) -> Dict[str, Any]:
    return {
        "levelCount": s.u32(0),
        "baseLog": s.u32(4),
        "glweDimension": s.u32(8),
        "polynomialSize": s.u32(12),
        "variance": s.f64(16),
        "integerPrecision": s.u32(24),
        "modulus": _modulus(s.struct(0, "modulus")),
        "keyType": _enum(KEY_TYPES, s.u16(28), "keyType"),
        "inputLweDimension": s.u32(32),
    }


def _keyswitch_params(s: _Struct) -> Dict[str, Any]:
    return {
        "levelCount": s.u32(0),
        "baseLog": s.u32(4),
        "variance": s.f64(8),
        "integerPrecision": s.u32(16),
        "modulus": _modulus(s.struct(0, "modulus")),
        "keyType": _enum(KEY_TYPES, s.u16(20), "keyType"),
        "inputLweDimension": s.u32(24),
        "outputLweDimension": s.u32(28),
    }


def _packing_params(s: _Struct) -> Dict[str, Any]:
    return {
        "levelCount": s.u32(0),
        "baseLog": s.u32(4),
        "glweDimension": s.u32(8),
        "polynomialSize": s.u32(12),
        "inputLweDimension": s.u32(16),
        "innerLweDimension": s.u32(20),
        "variance": s.f64(24),
        "integerPrecision": s.u32(32),
        "modulus": _modulus(s.struct(0, "modulus")),
        "keyType": _enum(KEY_TYPES, s.u16(36), "keyType"),
    }


def _key_info(s: _Struct, params) -> Dict[str, Any]:
    return {
        "id": s.u32(0),
        "inputId": s.u32(4),
        "outputId": s.u32(8),
        "params": params(s.struct(0, "params")),
        "compression": _enum(COMPRESSIONS, s.u16(12), "compression"),
    }


def _payload_bytes(message: _Message, payload: _Struct, what: str) -> int:
    blobs = payload.list(0, f"{what} payload")
    return sum(
        message.read_list(blobs.segment, word, f"{what} payload").byte_count(what)
        for word in blobs.pointers()
    )


def _bootstrap_bytes(p: Dict[str, Any]) -> int:
    glwe = p["glweDimension"] + 1
    return (
        p["inputLweDimension"]
        * p["levelCount"]
        * glwe
        * glwe
        * p["polynomialSize"]
        * p["integerPrecision"]
        // 8
    )


def _keyswitch_bytes(p: Dict[str, Any]) -> int:
    return (
        p["inputLweDimension"] * p["levelCount"] * (p["outputLweDimension"] + 1) * p["integerPrecision"] // 8
    )


KEY_KINDS = (  # (ServerKeyset pointer, spec name, params reader, payload size of uncompressed keys)
    (0, "lweBootstrapKeys", _bootstrap_params, _bootstrap_bytes),
    (1, "lweKeyswitchKeys", _keyswitch_params, _keyswitch_bytes),
    (2, "packingKeyswitchKeys", _packing_params, None),
)


def evaluation_key_bytes(specs: Dict[str, Any]) -> Optional[int]:
    """Payload bytes of an uncompressed key set of these client specs (None: not computable)."""
    total = 0
    for _, name, _, size in KEY_KINDS:
        for key in specs["keyset"].get(name, []):
            if size is None or key.get("compression", "none") != "none":
                return None
            total += size(key["params"])
    return total


def check_evaluation_keys(data: bytes, specs: Dict[str, Any]) -> None:
    """Raise `WireFormatError` unless `data` is exactly the key set the circuit of `specs` needs.

    Every key's id, secret-key ids, parameters and compression must equal the client
    specification's, and every uncompressed payload must have the byte size those parameters
    imply; no key may be missing or extra.
    """
    with _prefixed("evaluation_keys"):
        _check_keys(_Message(data, "evaluation_keys"), specs)


def _check_keys(message: _Message, specs: Dict[str, Any]) -> None:
    root = message.root()
    for pointer, name, params_reader, size in KEY_KINDS:
        expected = specs["keyset"].get(name, [])
        keys = root.list(pointer, name).structs(name)
        if len(keys) != len(expected):
            raise WireFormatError(
                f"evaluation_keys: {len(keys)} {name} but this circuit uses {len(expected)}: "
                "they were made for another circuit"
            )
        for index, (key, spec) in enumerate(zip(keys, expected)):
            what = f"evaluation_keys: {name}[{index}]"
            info = _key_info(key.struct(0, f"{name}[{index}].info"), params_reader)
            if info != spec:
                differences = _differences(info, spec)
                raise WireFormatError(
                    f"{what} has other parameters than this circuit's ({differences}): "
                    "they were made for another circuit; generate keys from this module's client.zip"
                )
            payload = _payload_bytes(message, key.struct(1, f"{name}[{index}].payload"), what)
            if spec.get("compression", "none") == "none":
                wanted = size(spec["params"]) if size is not None else None
                if wanted is None:
                    raise WireFormatError(
                        f"{what}: the server cannot check keys of this kind; "
                        "compile the model without packing keyswitch keys"
                    )
                if payload != wanted:
                    raise WireFormatError(f"{what}: payload of {payload} bytes, its parameters need {wanted}")


def check_ciphertext(data: bytes, gate: Dict[str, Any], what: str) -> None:
    """Raise `WireFormatError` unless `data` is a serialized ``Value`` fitting circuit input `gate`.

    `gate` is one entry of ``circuits[0].inputs`` of the client specification. Checked: the raw
    shape, precision and sign, the ciphertext's concrete shape, precision, compression, secret
    key id and LWE dimension, and that the payload holds exactly the bytes the shape implies.
    """
    with _prefixed(what):
        _check_value(_Message(data, what), gate, what)


def _check_value(message: _Message, gate: Dict[str, Any], what: str) -> None:
    root = message.root()
    raw = root.struct(1, "rawInfo")
    shape = raw.struct(0, "rawInfo.shape").list(0, "dimensions").u32s("dimensions")
    found_raw: Dict[str, Any] = {
        "shape": {"dimensions": shape},
        "integerPrecision": raw.u32(0),
        "isSigned": raw.bit(32),
    }
    if found_raw != gate["rawInfo"]:
        raise WireFormatError(
            f"{what}: a ciphertext of another shape or precision than this circuit's input "
            f"({_differences(found_raw, gate['rawInfo'])}): encrypt with this module's client.zip"
        )
    type_info = root.struct(2, "typeInfo")
    expected = gate["typeInfo"].get("lweCiphertext")
    if type_info.u16(0) != 0 or expected is None:
        raise WireFormatError(f"{what}: not an encrypted value of this circuit's input")
    lwe = type_info.struct(0, "typeInfo.lweCiphertext")
    encryption = lwe.struct(2, "encryption")
    found = {
        "concreteShape": {
            "dimensions": lwe.struct(1, "concreteShape").list(0, "dimensions").u32s("dimensions")
        },
        "integerPrecision": lwe.u32(0),
        "compression": _enum(COMPRESSIONS, lwe.u16(4), "compression"),
        "keyId": encryption.u32(0),
        "lweDimension": encryption.u32(4),
    }
    wanted = {
        "concreteShape": expected["concreteShape"],
        "integerPrecision": expected["integerPrecision"],
        "compression": expected.get("compression", "none"),
        "keyId": expected["encryption"]["keyId"],
        "lweDimension": expected["encryption"]["lweDimension"],
    }
    if found != wanted:
        raise WireFormatError(
            f"{what}: ciphertext parameters differ from this circuit's input "
            f"({_differences(found, wanted)}): encrypt with this module's client.zip"
        )
    payload = _payload_bytes(message, root.struct(0, "payload"), what)
    elements = 1
    for dimension in shape:
        elements *= dimension
    if wanted["compression"] == "none" and payload != elements * found_raw["integerPrecision"] // 8:
        raise WireFormatError(
            f"{what}: payload of {payload} bytes, its shape {shape} needs "
            f"{elements * found_raw['integerPrecision'] // 8}"
        )


@contextmanager
def _prefixed(what: str):
    """Errors raised inside name `what` first."""
    try:
        yield
    except WireFormatError as error:
        if str(error).startswith(what):
            raise
        raise WireFormatError(f"{what}: {error}") from None


def _differences(found: Any, expected: Any, path: str = "") -> str:
    """'field: found X, expected Y' for the first few differing leaves."""
    out: List[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        elif a != b:
            out.append(f"{where}: {a!r} instead of {b!r}")

    walk(found, expected, path)
    return "; ".join(out[:4]) or "layout"

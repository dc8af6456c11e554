"""Reading and writing Caffe files: deploy prototxt (text) and caffemodel (binary).

Protobuf's own parsers do the decoding over the schema in :mod:`caffe_schema`. The
caffemodel is walked one top-level field at a time over a memory map, and each layer
is parsed and turned into numpy arrays before the next is touched: a 217 MiB model
never sits in memory as a whole parsed message next to its arrays, corrupt data is
reported with its byte offset, and a progress bar can follow the bytes.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format

from .caffe_schema import V1_TO_TYPE, schema, v1_type_name
from .errors import ModelFormatError

_LAYER_FIELD = 100     # NetParameter.layer (current format)
_V1_LAYER_FIELD = 2    # NetParameter.layers (legacy V1 format)


@dataclass
class CaffeLayerWeights:
    """The learned blobs of one caffemodel layer, already as float32 arrays."""

    name: str
    type: str
    blobs: list[np.ndarray]
    legacy_shapes: list[bool]   # True where the blob used num/channels/height/width
    offset: int                 # byte offset of the layer record in the file


def load_prototxt(path: str | os.PathLike) -> pb_message.Message:
    """Parse a deploy prototxt (text format) into a NetParameter (a message class built at run time)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelFormatError(f"cannot read prototxt {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"prototxt {path} is not text (byte {exc.start} is not UTF-8); "
                               "is it a binary caffemodel?") from exc
    net = schema().NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise ModelFormatError(f"prototxt {path}: {exc}") from exc
    if not net.layer and not net.layers:
        raise ModelFormatError(f"prototxt {path} declares no layers")
    return net


def layer_type(layer: pb_message.Message) -> str:
    """The type string of a current or V1 layer message."""
    if hasattr(layer, "phase"):      # LayerParameter (current)
        return layer.type
    return V1_TO_TYPE.get(v1_type_name(layer.type), v1_type_name(layer.type))


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise EOFError
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _blob_array(blob: Any, where: str) -> tuple[np.ndarray, bool]:
    if blob.HasField("shape"):
        shape, legacy = tuple(int(d) for d in blob.shape.dim), False
    else:
        shape, legacy = (blob.num, blob.channels, blob.height, blob.width), True
    if len(blob.data):
        data = np.array(blob.data, dtype=np.float32)
    elif len(blob.double_data):
        data = np.array(blob.double_data, dtype=np.float64).astype(np.float32)
    else:
        raise ModelFormatError(f"{where}: blob has no data")
    count = int(np.prod(shape)) if shape else 1
    if count != data.size:
        raise ModelFormatError(f"{where}: blob shape {list(shape)} needs {count} values, file has {data.size}")
    return data.reshape(shape), legacy


def iter_caffemodel(path: str | os.PathLike, progress: bool | None = None) -> Iterator[CaffeLayerWeights]:
    """Yield each layer of a binary caffemodel that carries blobs, one at a time."""
    from tqdm import tqdm

    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ModelFormatError(f"cannot read caffemodel {path}: {exc.strerror}") from exc
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise ModelFormatError(f"caffemodel {path} is empty")
        S = schema()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf, \
                tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {Path(path).name}",
                     disable=None if progress is None else not progress, leave=False) as bar:
            pos = index = 0
            while pos < size:
                start = pos
                field, payload, pos = _next_record(buf, pos, size, path)
                if field in (_LAYER_FIELD, _V1_LAYER_FIELD):
                    cls = S.LayerParameter if field == _LAYER_FIELD else S.V1LayerParameter
                    layer = _parse_layer(cls, buf, payload, pos,
                                         f"caffemodel {path}: layer #{index} at byte offset {start}")
                    index += 1
                    if len(layer.blobs):
                        name, kind = layer.name, layer_type(layer)
                        where = f"caffemodel layer '{name}' (byte offset {start})"
                        arrays, legacy = zip(*(_blob_array(b, where) for b in layer.blobs), strict=True)
                        del layer   # keep at most one parsed layer alive beside its arrays
                        yield CaffeLayerWeights(name=name, type=kind, blobs=list(arrays),
                                                legacy_shapes=list(legacy), offset=start)
                if field is not None:
                    bar.update(pos - bar.n)
            if index == 0:
                raise ModelFormatError(f"caffemodel {path} holds no layers; is it a caffemodel?")


def _next_record(buf: mmap.mmap, pos: int, size: int, path: str | os.PathLike) -> tuple[int | None, int, int]:
    """(field, payload start, payload end) of the protobuf record at ``pos``.

    Scalar records (varint, fixed32/64) are skipped: field None, and the end is just past them.
    """
    start = pos
    try:
        tag, pos = _varint(buf, pos, size)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            _, pos = _varint(buf, pos, size)
            return None, pos, pos
        if wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > size:
                raise EOFError
            return None, pos, pos
        if wire != 2:
            raise ValueError(f"invalid field {field} wire type {wire}")
        length, pos = _varint(buf, pos, size)
    except EOFError as exc:
        raise ModelFormatError(f"caffemodel {path} is truncated at byte offset {start} "
                               f"(file is {size} bytes)") from exc
    except ValueError as exc:
        raise ModelFormatError(f"caffemodel {path} is corrupt at byte offset {start}: {exc}; "
                               "is it a caffemodel?") from exc
    if pos + length > size:
        raise ModelFormatError(f"caffemodel {path} is truncated: the record at byte offset {start} declares "
                               f"{length} bytes but only {size - pos} remain")
    return field, pos, pos + length


def _parse_layer(cls: type[pb_message.Message], buf: mmap.mmap, start: int, end: int, where: str) -> pb_message.Message:
    """One layer message parsed from ``buf[start:end]``; those pages are released afterwards."""
    with memoryview(buf)[start:end] as view:
        try:
            layer = cls.FromString(view)
        except pb_message.DecodeError as exc:
            raise ModelFormatError(f"{where} is corrupt ({exc})") from exc
    _release(buf, start, end)   # the parsed message now holds these bytes
    return layer


def _release(buf: mmap.mmap, start: int, end: int) -> None:
    """Drop mapped file pages from this process (they stay in the page cache).

    Keeps resident memory at the arrays plus one layer in flight, instead of the
    arrays plus the whole mapped file.
    """
    page = mmap.PAGESIZE
    first, last = (start // page) * page, (end // page) * page
    if last > first and hasattr(buf, "madvise"):
        buf.madvise(mmap.MADV_DONTNEED, first, last - first)


def write_caffemodel(path: str | os.PathLike, name: str,
                     layers: Sequence[tuple[str, str, Sequence[np.ndarray]]],
                     legacy_format: bool = False, legacy_shapes: bool = False,
                     packed: bool = True) -> None:
    """Write (layer name, type, blobs) as a binary caffemodel.

    ``legacy_format`` writes V1 ``layers`` records, ``legacy_shapes`` the
    num/channels/height/width blob encoding (padded to 4-D as Caffe did), and
    ``packed=False`` unpacked float fields: every variant Caffe has produced.
    """
    S = schema(packed)
    net = S.NetParameter(name=name)
    v1_numbers = {v: k for k, v in V1_TO_TYPE.items()}
    for layer_name, kind, blobs in layers:
        if legacy_format:
            layer = net.layers.add(name=layer_name)
            layer.type = S.enums["V1LayerType"].values_by_name[v1_numbers[kind]].number
        else:
            layer = net.layer.add(name=layer_name, type=kind)
        for array in blobs:
            blob = layer.blobs.add()
            if legacy_shapes:
                dims = (1,) * (4 - array.ndim) + tuple(array.shape)
                blob.num, blob.channels, blob.height, blob.width = dims
            else:
                blob.shape.dim.extend(array.shape)
            blob.data.extend(np.asarray(array, dtype=np.float32).ravel().tolist())
    Path(path).write_bytes(net.SerializeToString())

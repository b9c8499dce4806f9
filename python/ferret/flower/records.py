"""An upload as Flower records: one codec for every algorithm.

An algorithm object speaks bytes: ``client_update`` returns them, ``check_upload`` decides whether
the server may aggregate them, ``aggregate`` reads them. On Flower the bytes travel as one uint8
array, so the payload is exactly what the algorithm sends, and the algorithm alone knows its format.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from ..fl.algorithms import MalformedUpload

KEY = "upload"


def to_record(upload: bytes) -> RecordDict:
    """``upload`` as a record: an ArrayRecord holding one uint8 array."""
    return RecordDict({KEY: ArrayRecord({"bytes": Array(np.frombuffer(upload, dtype=np.uint8).copy())})})


def from_record(content: RecordDict) -> bytes:
    """The upload bytes in a reply's ``content``; :class:`MalformedUpload` when there are none."""
    try:
        array = content[KEY]["bytes"].numpy()
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedUpload(f"no upload in the reply: {err}") from None
    if array.dtype != np.uint8 or array.ndim != 1:
        raise MalformedUpload(f"the upload must be 1-d uint8, got {array.dtype} of shape {array.shape}")
    return array.tobytes()

"""Compression codecs: encode on the participant, decode or aggregate on the server.

>>> import numpy as np
>>> from fedagg import compress
>>> x = np.array([0.1, -3.0, 0.2, 2.0, 0.0], dtype=np.float32)
>>> codec = compress.TopK(k=2)
>>> state = codec.state(x.size)
>>> p = codec.encode(x, state)
>>> compress.decode(compress.Payload.from_frames(p.to_frames())).tolist()
[0.0, -3.0, 0.0, 2.0, 0.0]
>>> state.residual.tolist()          # error feedback: what was not sent
[0.10000000149011612, 0.0, 0.20000000298023224, 0.0, 0.0]
"""

from .codecs import (
    QSGD,
    ErrorFeedback,
    RandK,
    Rotation,
    Sign,
    TopK,
    Uniform,
    aggregate,
    codec_for,
    decode,
    decode_into,
    majority_vote,
    mean,
)
from .lowrank import PowerSGD, PowerSGDState
from .payload import Payload, PayloadError

__all__ = ["ErrorFeedback", "Payload", "PayloadError", "PowerSGD", "PowerSGDState", "QSGD", "RandK", "Rotation", "Sign", "TopK", "Uniform", "aggregate",
           "codec_for", "decode", "decode_into", "majority_vote", "mean"]

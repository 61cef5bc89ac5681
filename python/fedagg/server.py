"""``fedagg.server``: run an aggregation server (the transport lives in fedagg.transport).

>>> import numpy as np
>>> from fedagg import server
>>> cfg = server.ServerConfig(bind="tcp://127.0.0.1:0", rule="median", f=1, quorum=8, rounds=10)
>>> # server.serve(np.zeros(1000, np.float32), cfg)   # blocks; returns one metrics record per round
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from .transport.config import SecureConfig
from .transport.server import Server, ServerConfig

__all__ = ["SecureConfig", "Server", "ServerConfig", "serve"]


def serve(model: np.ndarray, config: ServerConfig, **kwargs: Any) -> List[Dict[str, Any]]:
    """Run rounds until ``config.rounds`` are done (or forever); returns the per-round metrics."""
    return Server(model, config, **kwargs).serve()

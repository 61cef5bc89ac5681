"""Streaming updates over ZeroMQ: the aggregation server and the participant client.

The protocol (two frames per message, chunked updates, credits) is in
``protocol.py`` and docs/protocol.md; ``server.Server`` runs rounds,
``client.Client`` takes part in them; ``keys`` makes CurveZMQ key pairs.
"""

from .client import Client, TransportError
from .protocol import Kind, ProtocolError
from .config import SecureConfig
from .server import Server, ServerConfig

__all__ = ["Client", "Kind", "ProtocolError", "SecureConfig", "Server", "ServerConfig", "TransportError"]

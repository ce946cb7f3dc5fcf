"""One request to a flow's gateway over a gRPC channel that stays open.

jina's ``Client.post`` opens a new channel, a new event loop turn and a streaming call for
every request; for one short query that set-up costs more than a hop through an executor.
This transport keeps one channel per address and sends each request as jina's unary
``process_single_data`` call, with the same ``DataRequest`` protobuf the gateway expects,
so any jina gateway answers it as it answers jina's own client.
"""

from __future__ import annotations

import ast
import re
import threading
import urllib.parse
from typing import Any, Dict, Optional, Tuple, Type

METHOD = "/jina.JinaSingleDataRequestRPC/process_single_data"
# What the client accepts and sends at most; each gateway enforces its own, smaller limit on requests.
MAX_MESSAGE_BYTES = 512 * 2**20


def server_message(description: str) -> str:
    """The first line of an executor's error as jina reports it (``StoreLockedError('index at ...')``, the
    repr of the exception), as the message alone."""
    text = description.strip()
    match = re.fullmatch(r"[A-Za-z_][\w.]*\((['\"])(.*)\1\)", text, flags=re.S)
    if match:
        try:
            text = str(ast.literal_eval(match.group(1) + match.group(2) + match.group(1)))
        except (ValueError, SyntaxError):
            text = match.group(2)
    return (text.strip().splitlines() or [description.strip()])[0]


class TransportError(RuntimeError):
    """The request did not get an answer; ``unreachable`` says whether the server could not be reached at all."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def _target(address: str):
    """'grpc://host:port' (or grpcs://, or host:port) -> ('host:port', tls)."""
    parsed = urllib.parse.urlparse(address if "://" in address else f"grpc://{address}")
    if parsed.scheme not in ("grpc", "grpcs"):
        raise ValueError(f"{address}: the flows speak gRPC; use grpc://host:port (or grpcs:// for TLS)")
    if not parsed.hostname or not parsed.port:
        raise ValueError(f"{address}: expected grpc://host:port")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{host}:{parsed.port}", parsed.scheme == "grpcs"


class GrpcTransport:
    """Posts ``DocList`` requests to jina gateways; one open channel per address, safe to share between threads."""

    def __init__(self):
        self._open: Dict[str, Tuple[Any, Any]] = {}  # address -> (channel, its unary call)
        self._lock = threading.Lock()

    def _call(self, address: str):
        with self._lock:
            if address not in self._open:
                import grpc
                from jina.proto.serializer import DataRequestProto

                target, tls = _target(address)
                options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
                channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=options) if tls
                           else grpc.insecure_channel(target, options=options))
                call = channel.unary_unary(METHOD, request_serializer=DataRequestProto.SerializeToString,
                                           response_deserializer=DataRequestProto.FromString)
                self._open[address] = (channel, call)
            return self._open[address][1]

    def post(self, address: str, endpoint: str, docs, return_type: Type, parameters: Optional[dict] = None,
             *, timeout: Optional[float] = None, target_executor: Optional[str] = None):
        """``docs`` to ``endpoint`` of the flow at ``address``; the answer's documents as ``return_type``."""
        return self.request(address, endpoint, docs, return_type, parameters, timeout=timeout,
                            target_executor=target_executor).docs

    def request(self, address: str, endpoint: str, docs, return_type: Type, parameters: Optional[dict] = None,
                *, timeout: Optional[float] = None, target_executor: Optional[str] = None):
        """As ``post``, but the whole answer: jina's ``DataRequest`` (its ``routes`` name the executors it went through)."""
        import grpc
        from jina.proto import jina_pb2
        from jina.types.request.data import DataRequest

        request = DataRequest()
        request.header.exec_endpoint = endpoint
        if target_executor:
            request.header.target_executor = target_executor
        if parameters:
            request.parameters = parameters
        request.data.docs = docs if docs is not None else return_type()
        for attempt in (1, 2):
            try:
                response = self._call(address)(request, timeout=timeout)
                break
            except grpc.RpcError as e:
                code = e.code() if callable(getattr(e, "code", None)) else None
                details = ((e.details() if callable(getattr(e, "details", None)) else "") or "").strip() or str(code)
                unreachable = code == grpc.StatusCode.UNAVAILABLE
                if unreachable:
                    # A channel that saw the server down backs off for up to minutes before it tries again;
                    # a fresh one connects now (a restarted server is reached at once). Every endpoint of the
                    # flows can be sent twice: indexing is an upsert by id, the rest reads or deletes by id.
                    self._forget(address)
                    if attempt == 1:
                        continue
                raise TransportError(details.splitlines()[0], unreachable=unreachable) from None
        status = response.header.status
        if status.code == jina_pb2.StatusProto.ERROR:
            description = status.description or status.exception.name or "the server answered with an error"
            raise TransportError(server_message(str(description)))
        response.document_array_cls = return_type
        return response

    def _forget(self, address: str) -> None:
        """The next request to ``address`` opens a new channel; the old one closes when no call uses it."""
        with self._lock:
            self._open.pop(address, None)

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._open.values():
                channel.close()
            self._open.clear()

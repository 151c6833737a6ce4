"""A DNS server of a few lines on loopback, answering one name with the addresses a test sets:
a headless Service's name, whose pods come and go. gRPC's resolver asks it when the channel's
target names it as the authority (`dns://127.0.0.1:PORT/name:port`)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Sequence

_A, _IN = 1, 1


class NameServer:
    def __init__(self, name: str, addresses: Sequence[str]) -> None:
        self.name = name.lower()
        self.addresses = list(addresses)
        self.queries = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        threading.Thread(target=self._serve, name="dns", daemon=True).start()

    def target(self, port: int) -> str:
        return f"dns://127.0.0.1:{self.port}/{self.name}:{port}"

    def close(self) -> None:
        self._socket.close()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self._socket.recvfrom(512)
            except OSError:
                return
            self.queries += 1
            self._socket.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        (ident,) = struct.unpack("!H", query[:2])
        end, labels = 12, []
        while length := query[end]:
            labels.append(query[end + 1 : end + 1 + length].decode().lower())
            end += 1 + length
        kind, _ = struct.unpack("!HH", query[end + 1 : end + 5])
        question = query[12 : end + 5]
        known = ".".join(labels) == self.name
        records = [
            b"\xc0\x0c" + struct.pack("!HHIH", _A, _IN, 1, 4) + socket.inet_aton(address)
            for address in (self.addresses if known and kind == _A else [])
        ]
        flags = 0x8180 | (0 if known else 3)  # a response, recursion available; NXDOMAIN
        header = struct.pack("!HHHHHH", ident, flags, 1, len(records), 0, 0)
        return header + question + b"".join(records)

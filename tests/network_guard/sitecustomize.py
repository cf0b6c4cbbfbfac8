"""Test guard (on PYTHONPATH, so every Python process of a test run imports it first): any
connection or name lookup beyond loopback is refused and written to $LMALIGN_NETWORK_GUARD_LOG,
so a test can prove a run never tried the network even where a library swallows the error."""

import os
import socket

_LOG = os.environ.get("LMALIGN_NETWORK_GUARD_LOG")
_LOOPBACK = ("localhost", "127.", "::1", "0.0.0.0")


def _refuse(what: str) -> None:
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} {what}\n")
    raise OSError(f"network guard: {what} refused (tests allow only 127.0.0.1)")


def _loopback(host) -> bool:
    return host is None or str(host).startswith(_LOOPBACK)


_connect, _connect_ex, _getaddrinfo = (socket.socket.connect, socket.socket.connect_ex,
                                       socket.getaddrinfo)


def _checked(original):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            _refuse(f"connect to {address[0]}:{address[1]}")
        return original(self, address)
    return connect


def _getaddrinfo_checked(host, *args, **kwargs):
    if not _loopback(host):
        _refuse(f"name lookup of {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _checked(_connect)
socket.socket.connect_ex = _checked(_connect_ex)
socket.getaddrinfo = _getaddrinfo_checked

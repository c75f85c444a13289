"""multimix.testing helpers that the other tests lean on."""

from __future__ import annotations

import socket

from multimix.testing import free_ports


def test_free_ports_are_distinct_bindable_and_outside_avoid():
    first = free_ports(1)[0]
    avoid = range(first, first + 500)
    ports = free_ports(30, avoid=avoid)
    assert len(set(ports)) == 30 and not any(p in avoid for p in ports)
    socks = []
    try:
        for p in ports:  # all free at once
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", p))
    finally:
        for s in socks:
            s.close()


def test_free_ports_gives_up_when_every_port_is_avoided():
    import pytest

    with pytest.raises(RuntimeError, match="no 2 free ports outside"):
        free_ports(2, avoid=range(0, 65536))

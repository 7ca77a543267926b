"""The suite's network guard really blocks outbound connections."""

import socket

import pytest

from tests.conftest import NetworkAccessError


def test_outbound_connect_fails_the_test():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(NetworkAccessError):
            s.connect(("93.184.216.34", 80))
    finally:
        s.close()


def test_dns_lookup_fails_the_test():
    with pytest.raises(NetworkAccessError):
        socket.getaddrinfo("huggingface.co", 443)

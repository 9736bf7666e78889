"""Callback signing and the SSRF guard, at submission and at connect time."""

import base64
import datetime
import hashlib
import hmac
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from standardwebhooks.webhooks import Webhook

from api.models import Client
from workers import callbacks

# The resolver before any test replaces it.
REAL_GETADDRINFO = socket.getaddrinfo


def test_the_signature_follows_standard_webhooks():
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    body = b'{"type":"image.done"}'

    signature = callbacks.sign(base64.b64decode(secret[6:]), "msg_1", 1700000000, body)

    expected = hmac.new(b"k" * 24, b"msg_1.1700000000." + body, hashlib.sha256).digest()
    assert signature == "v1," + base64.b64encode(expected).decode()
    # The reference implementation agrees (timestamp check aside).
    when = datetime.datetime.fromtimestamp(1700000000, datetime.UTC)
    assert Webhook(secret).sign("msg_1", when, body.decode()) == signature


def test_a_clients_webhook_key_is_the_decoded_secret():
    client = Client(webhook_secret="whsec_" + base64.b64encode(b"secret-bytes").decode())
    assert client.webhook_key == b"secret-bytes"


@pytest.mark.parametrize(
    "address,allowed",
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("240.0.0.1", False),
    ],
)
def test_only_public_unicast_addresses_are_allowed_by_default(settings, address, allowed):
    settings.CALLBACK_ALLOWED_NETWORKS = []
    assert callbacks.is_allowed_address(address) is allowed


def test_allowed_networks_open_a_private_range(settings):
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("10.0.0.0/8")]
    assert callbacks.is_allowed_address("10.9.9.9")
    assert not callbacks.is_allowed_address("192.168.1.1")


def test_localhost_is_refused_without_an_allowance(settings):
    settings.CALLBACK_ALLOWED_NETWORKS = []
    with pytest.raises(callbacks.BlockedAddress):
        callbacks.check_url("http://localhost:8000/hook")


def test_a_name_resolving_to_any_blocked_address_is_refused(settings, monkeypatch):
    settings.CALLBACK_ALLOWED_NETWORKS = []
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 80))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(callbacks.BlockedAddress):
        callbacks.check_url("http://mixed.example/hook")


class _Recorder(BaseHTTPRequestHandler):
    hits = []

    def do_POST(self):
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    _Recorder.hits = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def rebinding_url(monkeypatch, local_server):
    """A URL whose name resolves to a public address first (at submission) and to loopback after
    (when the worker connects), as a DNS-rebinding attacker's name does."""
    answers = iter(["93.184.216.34", "127.0.0.1"])

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    return f"http://rebind.example:{local_server}/hook"


def test_dns_rebinding_is_caught_at_connect_time(settings, monkeypatch, rebinding_url):
    """The name resolves to a public address when submitted and to loopback when the worker
    connects: the connection is refused and the local server never sees a request."""
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = []
    url = rebinding_url

    callbacks.check_url(url)  # submission: public, accepted
    result = callbacks.deliver(callbacks.guarded_session(), url, b"key", "msg_x", b"{}")

    assert result.status_code is None
    assert result.error.startswith("blocked")
    assert _Recorder.hits == []
    # With loopback allowed, the same delivery goes through: the guard, not the server, refused it.
    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda h, p, *a, **k: REAL_GETADDRINFO("127.0.0.1", p, *a, **k))
    assert callbacks.deliver(callbacks.guarded_session(), url, b"key", "msg_x", b"{}").status_code == 200
    assert _Recorder.hits == ["/hook"]


class _Redirector(BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(302)
        self.send_header("location", "http://10.0.0.1/internal")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_redirect_is_not_followed(settings):
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    server = HTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        result = callbacks.deliver(callbacks.guarded_session(), url, b"key", "msg_r", b"{}")
    finally:
        server.server_close()
    assert result.status_code == 302
    assert not result.delivered


def test_a_slow_receiver_times_out(settings):
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    settings.CALLBACK_TIMEOUT = 0.5
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        result = callbacks.deliver(callbacks.guarded_session(), f"http://127.0.0.1:{listener.getsockname()[1]}/", b"k", "m", b"{}")
    finally:
        listener.close()
    assert result.status_code is None
    assert "timed out" in result.error


def test_proxy_variables_are_ignored(settings, monkeypatch, local_server):
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    result = callbacks.deliver(callbacks.guarded_session(), f"http://127.0.0.1:{local_server}/p", b"k", "m", b"{}")
    assert result.status_code == 200


class _KeepAlive(BaseHTTPRequestHandler):
    """HTTP/1.1: connections stay open between requests unless `close_after` says otherwise."""

    protocol_version = "HTTP/1.1"
    connections = []
    close_after = False

    def setup(self):
        super().setup()
        _KeepAlive.connections.append(self.client_address)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
        # Closing without a `Connection: close` header: the client learns it from the socket.
        self.close_connection = _KeepAlive.close_after

    def log_message(self, *args):
        pass


@pytest.fixture
def keep_alive_server(settings):
    import ipaddress
    from http.server import ThreadingHTTPServer

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    _KeepAlive.connections, _KeepAlive.close_after = [], False
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAlive)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_a_worker_thread_reuses_its_connection_to_a_receiver(keep_alive_server):
    session = callbacks.kept_session()
    assert callbacks.kept_session() is session
    for attempt in range(3):
        assert callbacks.deliver(session, keep_alive_server, b"k", f"msg_{attempt}", b"{}").status_code == 200
    assert len(_KeepAlive.connections) == 1


def test_a_kept_connection_the_receiver_closed_is_replaced_without_a_failed_attempt(keep_alive_server):
    _KeepAlive.close_after = True
    session = callbacks.kept_session()
    assert callbacks.deliver(session, keep_alive_server, b"k", "msg_1", b"{}").status_code == 200
    time.sleep(0.2)  # the receiver's close reaches the client's socket
    assert callbacks.deliver(session, keep_alive_server, b"k", "msg_2", b"{}").status_code == 200
    assert len(_KeepAlive.connections) == 2


def test_callback_connections_send_without_nagle_delay(settings, local_server):
    """Headers and body go out in two writes: without TCP_NODELAY a kept connection waits for
    the receiver's delayed ACK (40 ms) before sending the body."""
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    sock = callbacks.GuardedHTTPConnection("127.0.0.1", local_server)._new_conn()
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


# --- The delivery loop's transport (aiohttp): the same guarantees ---------------------------


def post_async(url, body=b"{}"):
    """One attempt through the delivery loop's transport, on a loop of its own."""
    import asyncio

    async def attempt():
        async with callbacks.async_session() as session:
            return await callbacks.deliver_async(session, url, b"key", "msg_async", body)

    return asyncio.run(attempt())


@pytest.fixture
def loopback_allowed(settings):
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]


def test_the_async_transport_catches_dns_rebinding_at_connect_time(settings, rebinding_url):
    settings.CALLBACK_ALLOWED_NETWORKS = []
    url = rebinding_url
    callbacks.check_url(url)  # submission: public, accepted

    result = post_async(url)

    assert result.status_code is None and result.error.startswith("blocked"), result.error
    assert _Recorder.hits == []


def test_the_async_transport_checks_an_ip_literal_on_connect(settings, local_server):
    """aiohttp does not resolve IP literals: the socket factory sees the address all the same."""
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("10.0.0.0/8")]
    result = post_async(f"http://127.0.0.1:{local_server}/hook")
    assert result.status_code is None and result.error.startswith("blocked"), result.error
    assert _Recorder.hits == []

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    assert post_async(f"http://127.0.0.1:{local_server}/hook").status_code == 200
    assert _Recorder.hits == ["/hook"]


def test_the_async_transport_does_not_follow_a_redirect(loopback_allowed):
    server = HTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        result = post_async(f"http://127.0.0.1:{server.server_address[1]}/hook")
    finally:
        server.server_close()
    assert result.status_code == 302 and not result.delivered


def test_the_async_transport_ignores_proxy_variables(loopback_allowed, monkeypatch, local_server):
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    monkeypatch.setenv("http_proxy", "http://10.0.0.1:3128")
    assert post_async(f"http://127.0.0.1:{local_server}/p").status_code == 200


def test_the_async_transport_sends_standard_webhooks_headers(loopback_allowed):
    received = {}

    class Capture(BaseHTTPRequestHandler):
        def do_POST(self):
            received["headers"] = dict(self.headers)
            received["body"] = self.rfile.read(int(self.headers["content-length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.handle_request, daemon=True).start()
    secret = "whsec_" + base64.b64encode(b"key").decode()
    try:
        result = post_async(f"http://127.0.0.1:{server.server_address[1]}/hook", body=b'{"type":"image.done"}')
    finally:
        server.server_close()
    assert result.status_code == 204 and result.delivered
    assert Webhook(secret).verify(received["body"], received["headers"]) == {"type": "image.done"}
    assert received["headers"]["webhook-id"] == "msg_async"


def test_an_endpoint_dribbling_its_answer_is_cut_at_the_timeout(settings, loopback_allowed):
    """The answer comes a byte a second: the whole attempt, not each read, is bounded by
    CALLBACK_TIMEOUT, so the connection is dropped long before the answer would be complete."""
    settings.CALLBACK_TIMEOUT = 1.5
    settings.CALLBACK_CONNECT_TIMEOUT = 1.0
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    state = {"sent": 0, "dropped": False}
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def dribble():
        conn, _ = listener.accept()
        conn.recv(65536)
        try:
            for byte in answer:
                conn.sendall(bytes([byte]))
                state["sent"] += 1
                time.sleep(1)
        except OSError:
            state["dropped"] = True
        finally:
            conn.close()

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    try:
        result = post_async(f"http://127.0.0.1:{listener.getsockname()[1]}/slow")
        thread.join(10)
    finally:
        listener.close()
    assert result.status_code is None and result.error == "timed out after 1.5 s"
    assert state["dropped"] and state["sent"] < len(answer)


def test_a_connection_that_cannot_be_opened_gives_up_at_the_connect_timeout(settings, loopback_allowed):
    """A listener whose backlog is full drops new SYNs, as a dead host does."""
    settings.CALLBACK_TIMEOUT = 10.0
    settings.CALLBACK_CONNECT_TIMEOUT = 0.5
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue (never accepted)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        result = post_async(f"http://127.0.0.1:{listener.getsockname()[1]}/")
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert result.status_code is None
    assert result.error == "timed out connecting after 0.5 s", result.error

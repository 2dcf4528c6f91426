"""How the adapter (``etcd_store``) connects to etcd: the client built from ``EtcdOptions``,
and its auth token renewed in place (``Connector``).

A build turns the options into the client library's endpoints: the TLS credentials
(checked again at each build), each host in gRPC's form, the channel's options (keepalive,
the receive limit, the watch read on its own thread), and a login that one dead member
does not fail. A renewal logs in again on the same client, for the calls that follow.
Apart from the store because neither is a call the store makes for its callers: the
store holds the client it gets here, runs every call on it, and comes back here only to
build another one or when etcd refuses its token.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
import grpc.experimental
import pyetcd
from pyetcd import etcdrpc
from pyetcd.client import EtcdTokenCallCredentials

from hotknob.config.errors import Unavailable

from .etcd_client import ClosableClient
from .etcd_errors import map_error
from .etcd_types import MIN_KEEPALIVE_S, EtcdOptions, parse_endpoint

__all__ = ["Connector"]


def _grpc_options(o: EtcdOptions) -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", int(max(o.keepalive_time, MIN_KEEPALIVE_S) * 1000)),
        ("grpc.keepalive_timeout_ms", int(o.keepalive_timeout * 1000)),
        ("grpc.http2.ping_timeout_ms", int(o.keepalive_timeout * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # etcd sends every revision a watch missed in one message, and a range read
        # in one: gRPC's default 4 MiB limit refused those outright.
        ("grpc.max_receive_message_length", o.max_receive_bytes),
        # A watch's responses read on the watch's own thread (``etcd_client``).
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    ]


class Connector:
    """Builds clients for ``options`` and renews their auth token. Thread-safe."""

    def __init__(self, options: EtcdOptions) -> None:
        self.options = options
        self._auth_lock = threading.Lock()

    def build(self) -> Any:
        """A new client, logged in when the options name a user; raises the mapped error."""
        o = self.options
        creds = None
        if o.tls or any(parse_endpoint(e)[2] for e in o.endpoints):
            # Again at each build, not only at the start: files replaced since (a
            # certificate renewed before its key) are refused here, not by gRPC, which
            # gets the very bytes checked.
            if o.ca_cert is not None:
                ca, key, cert = o.checked_tls_bytes()
                creds = grpc.ssl_channel_credentials(ca, key, cert)
            else:
                o.check_tls_files()
                creds = grpc.ssl_channel_credentials()
        endpoints = []
        for text in o.endpoints:
            host, port, secure = parse_endpoint(text)
            is_secure = secure if secure is not None else o.tls
            endpoints.append(
                pyetcd.Endpoint(
                    f"[{host}]" if ":" in host else host,  # an IPv6 address: gRPC's form
                    port,
                    secure=is_secure,
                    creds=creds if is_secure else None,
                    time_retry=o.time_retry,
                    opts=_grpc_options(o),
                )
            )
        # With credentials the client authenticates at once, on an endpoint it picks at
        # random and without failing over: one dead member must not fail the build, so an
        # endpoint that cannot be reached is tried again (another pick), a few times each.
        attempts = 3 * len(endpoints) if o.user else 1
        while True:
            try:
                client = ClosableClient(
                    endpoints, timeout=o.timeout, user=o.user, password=o.password, failover=True
                )
                break
            except Exception as exc:
                err = map_error(exc, o, "authenticate")
                attempts -= 1
                if isinstance(err, Unavailable) and attempts > 0:
                    continue
                for endpoint in endpoints:
                    endpoint.close()
                raise err from exc
        if not any(e.secure for e in endpoints):
            # gRPC refuses call credentials on a plaintext channel; the token also
            # travels as metadata, which is all etcd reads.
            client.call_credentials = None
        return client

    def renew_token(self, client: Any, stale: Any) -> None:
        """Log in again and give ``client`` the new token, for the calls that follow.

        The client is kept, not rebuilt: closing it would also end the watch it carries
        (etcd checks the token when a watch is created, not on each event), and with a
        short token TTL an idle watcher's probe would then break its own watch every
        few seconds. ``stale`` is the token the failed call used: when another thread
        has renewed it meanwhile, that one is used.
        """
        o = self.options
        with self._auth_lock:
            if client.metadata is not stale:
                return
            request = etcdrpc.AuthenticateRequest(name=o.user, password=o.password)
            try:
                response = client.authstub.Authenticate(request, client.timeout)
            except Exception as exc:
                raise map_error(exc, o, "authenticate") from exc
            client.metadata = (("token", response.token),)
            if client.call_credentials is not None:
                client.call_credentials = grpc.metadata_call_credentials(
                    EtcdTokenCallCredentials(response.token)
                )

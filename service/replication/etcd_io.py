"""The etcd arbiter's I/O: carries out ``leased.py``'s effects, reports what etcd says.

Client: ``etcd3gw``, etcd's own HTTP/JSON gateway to its v3 API over
``requests``: it speaks TLS with client certificates (the arbiter's traffic
crosses hosts like the nodes' own), and its requests are plain blocking calls,
run here in threads with a timeout each. Two sessions, so that a slow read or
transaction never delays a lease renewal behind it. Requests leave from the
node's own address, as its links to its peers do, and ignore the environment's
CA bundle and proxies (``_session``).

Keys, all under the configured prefix P (one cluster per prefix):

- ``P/leader``: ``{"node": n, "epoch": e}`` on the leader's lease (E1);
- ``P/epoch``: the last epoch handed out, advanced by every claim;
- ``P/sync``: the sync set (as on the wire), written only by compare-and-swap
  on its mod_revision, conditioned on the leader key's value being the writer's;
- ``P/members/<n>``: ``{"position": [e, s], "database": ..., "fault": ...,
  "unproven": ...}`` on node n's lease: what it publishes about itself (E4).

Each node keeps one lease, renewed every ``renew_interval``; the time a renewal
was *sent* is what the core's fencing deadline counts from (E2). Every
``view_interval`` the node republishes its member key and reads the whole
prefix into an ``ArbiterView``; a read guides, it decides nothing. A key that
does not parse is reported as the store being unusable, with the key's name:
the node then neither claims nor serves past its deadline, and says why.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import etcd3gw
import requests
from etcd3gw.exceptions import Etcd3Exception
from requests.adapters import HTTPAdapter

from ..peer import source_address
from .arbiter import (
    ArbiterEvent,
    ArbiterUnreachable,
    ArbiterView,
    Claimed,
    ClaimRefused,
    LeaseLost,
    LeaseRenewed,
    MemberInfo,
    SyncSetRefused,
    SyncSetStored,
)
from .effects import ClaimLeader, ReleaseLeader, StoreSyncSet
from .leased import LeaseTiming
from .messages import sync_set_from_wire, sync_set_to_wire
from .shell import log_event
from .state import ReplicaCore
from .types import Position, SyncSet

VIEW_INTERVAL = 0.2
# The longest reason an unreachable arbiter is reported with (status, logs).
MAX_WHY = 200
# An object's repr inside urllib3's messages, with the separator after it.
_OBJECT = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>(, |: )?")


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[tuple[str, int], ...]
    prefix: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    # This node's own host: requests to etcd leave from it, like the node's links
    # to its peers (``peer.source_address``), so a cut of this host is a cut of both.
    host: str | None = None


class Garbled(Exception):
    """A key under our prefix holds something we never write."""


def _b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode("ascii")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


class EtcdIO:
    """One node's conversation with etcd."""

    def __init__(
        self,
        settings: EtcdSettings,
        timing: LeaseTiming,
        core: ReplicaCore,
        report: Callable[[ArbiterEvent], None],
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.timing = timing
        self.core = core
        self.report = report
        self.now = now
        self.prefix = settings.prefix.rstrip("/") + "/"
        self._endpoint = 0
        self._lease_client = self._client()
        self._client_for_kv = self._client()
        self._kv_lock = asyncio.Lock()
        self.lease_id: int | None = None
        # The exact bytes of the leader key we wrote, while we hold it.
        self.leader_value: bytes | None = None
        self.closing = False

    # ---- clients ------------------------------------------------------------------------

    def _client(self) -> etcd3gw.Etcd3Client:
        host, port = self.settings.endpoints[self._endpoint % len(self.settings.endpoints)]
        return etcd3gw.Etcd3Client(
            host=host,
            port=port,
            protocol="https" if self.settings.ca is not None else "http",
            session=_session(self.settings, host),
            timeout=self.timing.request_timeout,
            api_path="/v3/",
        )

    def _next_endpoint(self) -> None:
        """The endpoint did not answer: the next requests try another member."""
        if len(self.settings.endpoints) > 1:
            self._endpoint += 1
            self._lease_client = self._client()
            self._client_for_kv = self._client()

    def _key(self, name: str) -> str:
        return self.prefix + name

    async def _kv(self, call: Callable[[etcd3gw.Etcd3Client], Any]) -> Any:
        async with self._kv_lock:
            client = self._client_for_kv
            return await asyncio.to_thread(call, client)

    def _unreachable(self, exc: BaseException) -> None:
        host, port = self.settings.endpoints[self._endpoint % len(self.settings.endpoints)]
        self._next_endpoint()
        self.report(ArbiterUnreachable(f"{host}:{port}: {_describe(exc)}"))

    # ---- the loops ------------------------------------------------------------------------

    async def run_lease(self) -> None:
        """Keep our lease alive; report each renewal with the time it was sent."""
        while not self.closing:
            sent = self.now()
            try:
                ttl = await asyncio.to_thread(self._renew)
            except (Etcd3Exception, OSError, ValueError) as exc:
                self._unreachable(exc)
            else:
                if ttl > 0:
                    self.report(LeaseRenewed(sent))
                else:
                    self.lease_id = None
                    self.leader_value = None
                    self.report(LeaseLost("the arbiter no longer knows our lease"))
                    continue  # grant a new one at once
            await asyncio.sleep(max(0.0, sent + self.timing.renew_interval - self.now()))

    def _renew(self) -> int:
        client = self._lease_client
        if self.lease_id is None:
            result = client.post(
                client.get_url("/lease/grant"), json={"TTL": int(self.timing.ttl), "ID": 0}
            )
            self.lease_id = int(result["ID"])
            return int(result.get("TTL", 0))
        result = client.post(client.get_url("/lease/keepalive"), json={"ID": self.lease_id})
        return int(result.get("result", {}).get("TTL", -1))

    async def run_view(self) -> None:
        """Publish our member key and read the prefix, every VIEW_INTERVAL."""
        while not self.closing:
            started = self.now()
            try:
                await self._publish()
                view = await self._read()
            except Garbled as exc:
                self.report(ArbiterUnreachable(f"cannot use the arbiter's keys: {exc}"))
            except (Etcd3Exception, OSError, ValueError) as exc:
                self._unreachable(exc)
            else:
                self.report(view)
            await asyncio.sleep(max(0.0, started + VIEW_INTERVAL - self.now()))

    async def _publish(self) -> None:
        lease = self.lease_id
        if lease is None:
            return
        core = self.core
        value = _json(
            {
                "position": [core.position.epoch, core.position.seq],
                "database": core.database,
                "fault": core.fault,
                "unproven": core.unproven,
            }
        )
        request = {
            "key": _b64(self._key(f"members/{core.node_id}")),
            "value": _b64(value),
            "lease": str(lease),
        }
        await self._kv(lambda client: client.post(client.get_url("/kv/put"), json=request))

    async def _read(self) -> ArbiterView:
        items = await self._kv(lambda client: client.get_prefix(self.prefix))
        return await self._parse(items)

    async def _parse(self, items: list[tuple[bytes, dict[str, Any]]]) -> ArbiterView:
        leader, leader_epoch, leader_lease = None, 0, 0
        epoch, sync_set, sync_revision = 0, None, 0
        members: dict[int, MemberInfo] = {}
        for value, meta in items:
            name = _text(meta["key"])[len(self.prefix) :]
            try:
                data = json.loads(value)
                if name == "leader":
                    leader, leader_epoch = _int(data["node"]), _int(data["epoch"])
                    leader_lease = int(meta.get("lease", 0))
                elif name == "epoch":
                    epoch = _int(data)
                elif name == "sync":
                    sync_set, sync_revision = _sync_set(data), int(meta["mod_revision"])
                elif name.startswith("members/"):
                    node = int(name.removeprefix("members/"))
                    members[node] = _member(node, data)
            except (ValueError, KeyError, TypeError) as exc:
                raise Garbled(f"{self.prefix}{name} holds {value[:60]!r} ({exc})") from None
        ttl = None
        if leader is not None and leader_lease:
            ttl = await self._lease_ttl(leader_lease)
        return ArbiterView(leader, leader_epoch, epoch, sync_set, sync_revision, members, ttl)

    async def _lease_ttl(self, lease: int) -> float | None:
        def call(client: etcd3gw.Etcd3Client) -> Any:
            return client.post(client.get_url("/kv/lease/timetolive"), json={"ID": lease})

        result = await self._kv(call)
        ttl = int(result.get("TTL", -1))
        return float(ttl) if ttl >= 0 else None

    # ---- effects ----------------------------------------------------------------------------

    async def carry_out(self, effect: ClaimLeader | StoreSyncSet | ReleaseLeader) -> None:
        """One effect of the leased arbiter (the runtime spawns each as a task)."""
        match effect:
            case ClaimLeader():
                await self.claim(effect)
            case StoreSyncSet():
                await self.store_sync_set(effect)
            case ReleaseLeader():
                await self.release()

    async def claim(self, effect: ClaimLeader) -> None:
        """E1: leader key absent → ours (on our lease), epoch advanced, sync set unchanged."""
        lease = self.lease_id
        if lease is None:
            self.report(ClaimRefused("no lease from the arbiter yet"))
            return
        value = _json({"node": self.core.node_id, "epoch": effect.epoch})
        compare = [_absent(self._key("leader"))]
        if effect.expected_epoch:
            compare.append(_value_is(self._key("epoch"), _json(effect.expected_epoch)))
        else:
            compare.append(_absent(self._key("epoch")))
        if effect.sync_revision is not None:
            compare.append(_mod_is(self._key("sync"), effect.sync_revision))
        txn = {
            "compare": compare,
            "success": [
                _put(self._key("leader"), value, lease),
                _put(self._key("epoch"), _json(effect.epoch)),
            ],
            "failure": [],
        }
        try:
            result = await self._kv(lambda client: client.transaction(txn))
        except (Etcd3Exception, OSError, ValueError) as exc:
            # The outcome is unknown: if it went through, the view shows our key and
            # the core gives it back (it never serves on a key it did not hear of).
            self._unreachable(exc)
            self.report(ClaimRefused(f"no answer from the arbiter: {exc}"))
            return
        if result.get("succeeded"):
            self.leader_value = value
            self.report(Claimed(effect.epoch))
        else:
            self.report(ClaimRefused("the leader key, the epoch or the sync set changed"))

    async def store_sync_set(self, effect: StoreSyncSet) -> None:
        """E3: the sync set from ``expected_revision`` to ours, while the key is ours."""
        leader = self.leader_value
        if leader is None:
            self.report(
                SyncSetRefused(
                    effect.seq,
                    "this node does not hold the leader key",
                    epoch=effect.sync_set.epoch,
                )
            )
            return
        value = _json(sync_set_to_wire(effect.sync_set))
        txn = {
            "compare": [
                _value_is(self._key("leader"), leader),
                _mod_is(self._key("sync"), effect.expected_revision),
            ],
            "success": [_put(self._key("sync"), value)],
            "failure": [],
        }
        try:
            result = await self._kv(lambda client: client.transaction(txn))
        except (Etcd3Exception, OSError, ValueError) as exc:
            self._unreachable(exc)
            await self._settle_store(effect, value)
            return
        if result.get("succeeded"):
            revision = int(result["header"]["revision"])
            self.report(SyncSetStored(effect.seq, revision, epoch=effect.sync_set.epoch))
        else:
            self.report(
                SyncSetRefused(
                    effect.seq,
                    "the leader key or the sync set changed",
                    epoch=effect.sync_set.epoch,
                )
            )

    async def _settle_store(self, effect: StoreSyncSet, value: bytes) -> None:
        """A compare-and-swap whose answer was lost: read what the store holds."""
        key = self._key("sync")
        try:
            items = await self._kv(lambda client: client.get(key, metadata=True))
        except (Etcd3Exception, OSError, ValueError) as exc:
            self.report(
                SyncSetRefused(
                    effect.seq,
                    f"no answer from the arbiter: {exc}",
                    True,
                    epoch=effect.sync_set.epoch,
                )
            )
            return
        for stored, meta in items:
            if stored == value:
                self.report(
                    SyncSetStored(
                        effect.seq, int(meta["mod_revision"]), epoch=effect.sync_set.epoch
                    )
                )
                return
        self.report(
            SyncSetRefused(
                effect.seq, "not stored; writing it again", True, epoch=effect.sync_set.epoch
            )
        )

    async def release(self) -> None:
        """Delete the leader key if it names this node (read, then delete if unchanged)."""
        key = self._key("leader")
        self.leader_value = None
        try:
            items = await self._kv(lambda client: client.get(key, metadata=True))
            for value, meta in items:
                if _int(json.loads(value).get("node")) != self.core.node_id:
                    return
                txn = {
                    "compare": [_mod_is(key, int(meta["mod_revision"]))],
                    "success": [{"request_delete_range": {"key": _b64(key)}}],
                    "failure": [],
                }
                await self._kv(lambda client, txn=txn: client.transaction(txn))  # type: ignore[misc]
        except (Etcd3Exception, OSError, ValueError, TypeError, AttributeError) as exc:
            log_event("leader key not released", {"node": self.core.node_id, "why": str(exc)})

    async def close(self) -> None:
        """A clean stop: revoke the lease, so our keys (the leader key) go at once."""
        self.closing = True
        lease, self.lease_id = self.lease_id, None
        if lease is None:
            return
        client = self._lease_client
        try:
            await asyncio.to_thread(
                client.post, client.get_url("/lease/revoke"), json={"ID": lease}
            )
        except (Etcd3Exception, OSError, ValueError) as exc:
            log_event("lease not revoked", {"node": self.core.node_id, "why": str(exc)})


def _describe(exc: BaseException) -> str:
    """A failed request in one short line: etcd3gw keeps the text in ``detail_text``
    (its ``str`` is empty), and requests nests the cause of a connection failure
    (``...: Max retries exceeded with url: ... (Caused by ...)``): keep the cause."""
    text = str(getattr(exc, "detail_text", None) or exc)
    _, caused, cause = text.rpartition("(Caused by ")
    if caused:
        text = cause.removesuffix(")")
    text = _OBJECT.sub("", text)  # "<HTTPSConnection(...) at 0x7f...>, ": new every time
    return f"{type(exc).__name__}: {text}".strip().removesuffix(":")[:MAX_WHY]


class _FromAddress(HTTPAdapter):
    """Connections opened from one local address (``source_address``)."""

    def __init__(self, source: tuple[str, int]) -> None:
        self.source = source  # before super().__init__, which makes the pool manager
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs, source_address=self.source)


def _session(settings: EtcdSettings, etcd_host: str) -> requests.Session:
    """An HTTP session to one etcd member that trusts the configured CA and nothing
    from the environment, and leaves from this node's own address.

    ``requests`` lets ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` override a
    session's own ``verify`` (the system bundle then replaces our CA, and every
    request fails verification), and sends through ``HTTPS_PROXY`` and friends:
    the arbiter's traffic goes straight to the etcd members, checked against the
    cluster's CA, whatever the node's environment says. Without a source address
    the kernel picks one: on one machine every node's requests would come from
    127.0.0.1, and cutting a node off from etcd would cut nothing."""
    session = requests.Session()
    session.trust_env = False
    source = None if settings.host is None else source_address(settings.host, etcd_host)
    if source is not None:
        for scheme in ("http://", "https://"):
            session.mount(scheme, _FromAddress(source))
    if settings.ca is not None:
        session.verify = settings.ca
    if settings.cert is not None and settings.key is not None:
        session.cert = (settings.cert, settings.key)
    return session


# ---- transactions in the gateway's JSON -----------------------------------------------------


def _absent(key: str) -> dict[str, Any]:
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def _mod_is(key: str, revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def _value_is(key: str, value: bytes) -> dict[str, Any]:
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def _put(key: str, value: bytes, lease: int | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease is not None:
        request["lease"] = str(lease)
    return {"request_put": request}


# ---- parsing what we read: anything but what we write is garbled ---------------------------


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"not an integer: {value!r}")
    return value


def _sync_set(data: Any) -> SyncSet:
    if not isinstance(data, dict) or not isinstance(data.get("members"), list):
        raise ValueError("not a sync set")
    sync_set = sync_set_from_wire(data)
    if not sync_set.members:
        raise ValueError("a sync set without members")
    return sync_set


def _member(node: int, data: Any) -> MemberInfo:
    if not isinstance(data, dict):
        raise ValueError("not a member record")
    position = data["position"]
    if not isinstance(position, list) or len(position) != 2:
        raise ValueError("bad position")
    database = data["database"]
    fault, unproven = data.get("fault"), data.get("unproven")
    if not isinstance(database, str) or not all(
        v is None or isinstance(v, str) for v in (fault, unproven)
    ):
        raise ValueError("bad member fields")
    return MemberInfo(
        node, Position(_int(position[0]), _int(position[1])), database, fault, unproven
    )

"""The composition root: one node, built from one frozen config, read top to bottom.

    config ─► data dir ─► secret ─► storage ─► replicator (core + runtime + peer links) ─► server
                                                  metrics ◄─ (events; state read when scraped)

Storage and the replicator know nothing of the chat: this is where they are
handed its schema (``chat_schema.MIGRATIONS``) and what a client write does
(``chat.ChatApplication``).

``run`` starts everything, waits for SIGTERM or SIGINT, and shuts down in the
reverse order: stop accepting, stop replicating, close the database. Nothing
here decides anything; it only wires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from pathlib import Path

from . import backup, chat, chat_schema, datadir, identity, throttle
from .config import NodeConfig
from .errors import StorageCorrupt
from .logline import format_fields, os_why
from .metrics import Metrics, sample_node
from .replication.runtime import Replicator
from .server import Server
from .storage import (
    Storage,
    move_aside,
    prune_moved_aside,
    prune_rollback_files,
    remove_database_files,
)

log = logging.getLogger("service.node")

BIND_FIRST_RETRY = 0.5
BIND_MAX_RETRY = 10.0


def load_or_create_secret(path: Path) -> bytes:
    """The shared cluster secret; created atomically on the first start of any node.

    Three nodes may start at once: each writes its own candidate file and links
    it into place, which fails for all but the first, and then all read the winner.
    """
    if not path.exists():
        datadir.make_private_dirs(path.parent)
        candidate = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(candidate, path)
        candidate.unlink()
    # A secret file made by hand, or before the node made its files private.
    datadir.tighten(path)
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise SystemExit(f"cluster secret in {path.name} is too short (at least 16 bytes)")
    return secret


def remove_copies_in_transit(config: NodeConfig) -> None:
    """Remove the snapshot files a crash left (``NodeConfig.copies_in_transit``): each
    is as large as the database, and none is used again (a snapshot is sent anew).
    A disk that refuses is logged, and the node starts all the same. Safe only in
    the one process that uses the data dir (``datadir.lock``): ``python -m service``
    calls it once, right after taking the lock and before the database opens (on
    a disk too full to open it, such a copy is what takes the room)."""
    folder = config.data_dir
    # And an operator's backup that was streaming (``backup.py``, names of its own).
    try:
        streamed = sorted(
            [*folder.glob(f"{backup.PREFIX}*.db"), *folder.glob(f"{backup.PREFIX}*.db.partial")]
        )
    except OSError as exc:  # the node starts all the same; opening the database says why
        log.warning(
            format_fields("data dir not listed", {"node": config.node_id, "why": os_why(exc)})
        )
        streamed = []
    for path in [*config.copies_in_transit(), *streamed]:
        try:
            if not path.exists():
                continue
            remove_database_files(path)
        except OSError as exc:
            fields = {"node": config.node_id, "file": path.name, "why": os_why(exc)}
            log.warning(format_fields("snapshot copy not removed", fields))
        else:
            fields = {"node": config.node_id, "file": path.name}
            log.info(format_fields("snapshot copy left by a crash removed", fields))


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        # Created 0700, or refused unless private (``python -m service`` waits for that).
        datadir.prepare(config.data_dir)
        self.secret = load_or_create_secret(config.secret_file)
        self.identity_path = config.data_dir / identity.FILE_NAME
        recorded = identity.read(self.identity_path)
        before = identity.observe(config.db_path)
        damage = self._open_checked(recorded)
        if damage is not None:
            damaged = config.data_dir / "damaged"
            moved = move_aside(config.db_path, damaged)
            # WARNING, not an error: the node has contained it; nothing acknowledged
            # is lost while the others hold it (and status says if they do not).
            log.warning(
                "database damaged, moved aside node=%s to=%s why=%s",
                config.node_id,
                moved,
                damage.replace(" ", "_"),
            )
            # A disk that keeps damaging it would otherwise fill with copies.
            try:
                gone = prune_moved_aside(damaged, moved, config.damaged_max_files)
            except OSError as exc:  # the node starts all the same: the copies wait
                log.warning("damaged copies not pruned node=%s why=%s", config.node_id, exc)
            else:
                if gone:
                    log.info(
                        "damaged copies pruned node=%s files=%s",
                        config.node_id,
                        ",".join(p.name for p in gone),
                    )
            # A new, empty database: not the member any sync set names (E4). It
            # rejoins by snapshot from a healthy primary, and never leads meanwhile.
            self.storage = self._open_storage()
            recorded = identity.Identity(
                self.storage.database_id, True, f"its database was damaged ({damage})"
            )
        # Bounds lowered since the last run apply at once, not at the next rewind.
        pruned = prune_rollback_files(
            config.rollback_dir, config.rollback_max_files, config.rollback_max_bytes
        )
        if pruned:
            log.info("rollback files pruned files=%s", ",".join(p.name for p in pruned))
        # Commits return before the fsync; the replicator's group sync does it.
        self.storage.defer_sync()
        suspect = identity.verdict(recorded, self.storage.database_id, before)
        if suspect is not None:
            log.warning(
                "database suspect node=%s database=%s why=%s",
                config.node_id,
                self.storage.database_id,
                suspect.replace(" ", "_"),
            )
        self._write_identity(clean=False, suspect=suspect)
        self.metrics = Metrics()
        self.replicator = Replicator(
            config,
            self.storage,
            self.secret,
            chat.ChatApplication(config.request_retention),
            unproven=suspect,
            metrics=self.metrics,
        )
        self.replicator.proven_hooks.append(lambda: self._write_identity(False, None))
        self.replicator.damage_hooks.append(self._mark_damaged)
        self.server = Server(config, self.replicator, self.storage, self.replicator.links)
        self.metrics.watch(lambda: sample_node(self.replicator, self.server))

    def _open_storage(self) -> Storage:
        """The node's database with the chat's schema (made or migrated as needed)."""
        return Storage(
            self.config.db_path, self.config.synchronous, migrations=chat_schema.MIGRATIONS
        )

    def _open_checked(self, recorded: identity.Identity | None) -> str | None:
        """Open the database and check its pages (``quick_check``); return what is
        damaged (the database is then closed, for moving aside), or None."""
        if recorded is not None and recorded.damaged:
            return recorded.suspect or "damaged pages were found while it ran"
        if not self.config.db_path.exists():
            self.storage = self._open_storage()
            return None
        try:
            self.storage = self._open_storage()
        except StorageCorrupt as exc:
            return str(exc)
        damage = self.storage.quick_check()
        if damage is not None:
            self.storage.close()
        return damage

    async def _listen(self, stop: asyncio.Event) -> bool:
        """Bind the node's address, waiting while it is taken (an old process still
        holds it): one log line per new reason and a backoff, never an exit (under
        supervisord, an exit a second). False if told to stop first."""
        delay, said = BIND_FIRST_RETRY, ""
        while True:
            try:
                await self.server.start()
                if said:
                    log.info("bound address=%s", self.config.me.address)
                return True
            except OSError as exc:
                why = exc.strerror or str(exc)
                if why != said:
                    said = why
                    log.error(
                        "cannot listen address=%s why=%s (trying again with backoff)",
                        self.config.me.address,
                        why.replace(" ", "_"),
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
                return False
            delay = min(delay * 2, BIND_MAX_RETRY)

    def _write_identity(self, clean: bool, suspect: str | None, damaged: bool = False) -> None:
        record = identity.Identity(self.storage.database_id, clean, suspect, damaged)
        try:
            identity.write(self.identity_path, record)
        except OSError as exc:
            # A full disk: the suspicion lives on in memory for this run.
            log.warning("cannot write the identity file why=%s", exc.strerror or exc)

    def _mark_damaged(self, why: str) -> None:
        self._write_identity(False, why, damaged=True)

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if not await self._listen(stop):
            self.storage.close()
            return
        self.replicator.start()
        endpoint = self.config.metrics_endpoint
        metrics = None if endpoint is None else loop.create_task(self.metrics.serve(endpoint))
        position = self.storage.position()
        log.info(
            "listening node=%s address=%s epoch=%s seq=%s",
            self.config.node_id,
            self.config.me.address,
            position.epoch,
            position.seq,
        )
        await stop.wait()
        log.info("stopping node=%s", self.config.node_id)
        if metrics is not None:
            metrics.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await metrics
            await self.metrics.close()
        await self.server.close()
        await self.replicator.close()
        throttle.close_windows()  # the counts of the last windows, before "stopped"
        # Nothing writes any more: the WAL that close() removes is no loss.
        self._write_identity(clean=True, suspect=self.replicator.core.unproven)
        self.storage.close()
        log.info("stopped node=%s", self.config.node_id)

"""Tile batches through system shared memory, for a client on the server's host.

Over gRPC every tile batch is serialised into the request and copied by the
server. With ``--shared-memory`` the client writes each batch into a POSIX
shared memory region that it registered with Triton, and the request names the
region instead of carrying the bytes. That only works when the client and the
server see one ``/dev/shm``: the same machine, or containers of one Kubernetes
pod that share an ``emptyDir`` with ``medium: Memory`` mounted at ``/dev/shm``.

The ring has one slot per request that may be in flight. A slot is taken when a
batch is sent and given back when that request's response arrives, so a batch
is never overwritten while the server may still read it. When the stream breaks,
every slot is given back, because the server has dropped the requests in flight.

A client killed with SIGKILL cannot unregister its regions, so the server keeps
them mapped. Python's resource tracker still unlinks the client's files in
/dev/shm, so the next ring unregisters every ``histomet_`` region whose file is
gone: a live client's region always has its file.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
from pathlib import Path
from types import TracebackType

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as system_shm
from tritonclient.utils import InferenceServerException

from histomet.errors import InferenceError
from histomet.serve.launcher import ADMIN_KEY_ENV

_LOGGER = logging.getLogger(__name__)

_PREFIX = "histomet_"
_SHM_DIR = Path("/dev/shm")


class SharedMemoryError(InferenceError):
    """A shared memory region could not be created or registered."""


class SharedTileRing:
    """Registered system shared memory regions, one slot per request in flight."""

    def __init__(
        self,
        client: grpcclient.InferenceServerClient,
        slots: int,
        slot_bytes: int,
        headers: dict[str, str] | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"invalid slot count {slots}: expected >= 1")
        if slot_bytes < 1:
            raise ValueError(f"invalid slot size {slot_bytes} bytes: expected >= 1")
        self._client = client
        # A server started with an admin key restricts the shared-memory protocol
        # to requests that carry the key.
        self._headers = headers
        self.slot_bytes = slot_bytes
        # Names are unique per process and ring, so two clients on one host, or
        # two slides in one process, never write into each other's regions.
        prefix = f"{_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        self.names = [f"{prefix}_{index}" for index in range(slots)]
        self._handles: list = []
        self._registered: list[str] = []
        self._free: queue.Queue[int] = queue.Queue()
        self._in_use: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> SharedTileRing:
        try:
            for index, name in enumerate(self.names):
                handle = system_shm.create_shared_memory_region(
                    name, f"/{name}", self.slot_bytes
                )
                self._handles.append(handle)
                self._client.register_system_shared_memory(
                    name, f"/{name}", self.slot_bytes, headers=self._headers
                )
                self._registered.append(name)
                self._free.put(index)
            # Only after the server mapped this client's regions: that proves one
            # /dev/shm, so a missing file means a dead client, not another host.
            self._unregister_orphans()
        except (InferenceServerException, system_shm.SharedMemoryException) as error:
            self.close()
            message = error.message() if hasattr(error, "message") else str(error)
            hint = (
                "--shared-memory needs the client and the server on one host with "
                "one /dev/shm (in Kubernetes, one pod); run without it otherwise"
            )
            if "admin-key" in message or "restricted" in message.lower():
                hint = (
                    "the server restricts shared memory to its admin key: set "
                    f"{ADMIN_KEY_ENV} for the client as well, or run without "
                    "--shared-memory"
                    if self._headers is None
                    else f"the server restricts shared memory to its admin key, and "
                    f"{ADMIN_KEY_ENV} does not match it: set the server's key, or "
                    "run without --shared-memory"
                )
            raise SharedMemoryError(
                f"setting up system shared memory slots of {self.slot_bytes} bytes "
                f"with the server failed ({message})",
                hint,
            ) from error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def put(
        self, request_id: str, tiles: np.ndarray, timeout_s: float = 600.0
    ) -> tuple[str, int]:
        """Write a batch into a free slot and return the region name and byte count.

        Waits up to ``timeout_s`` for a free slot. The caller's in-flight window
        keeps one free, so the wait ends at once unless responses stopped coming.
        """
        if tiles.nbytes > self.slot_bytes:
            raise ValueError(
                f"a batch of {tiles.nbytes} bytes does not fit a "
                f"{self.slot_bytes}-byte slot"
            )
        try:
            index = self._free.get(timeout=timeout_s)
        except queue.Empty:
            raise SharedMemoryError(
                f"no shared memory slot was freed within {timeout_s:g} s",
                "the server stopped answering; retry the slide when it is back",
            ) from None
        system_shm.set_shared_memory_region(self._handles[index], [tiles])
        with self._lock:
            self._in_use[request_id] = index
        return self.names[index], tiles.nbytes

    def release(self, request_id: str | None) -> None:
        """Give back the slot of a request whose response or error arrived.

        An error without a request id means that the stream broke, and then
        every slot is given back.
        """
        with self._lock:
            if request_id is None:
                freed = list(self._in_use.values())
                self._in_use.clear()
            else:
                index = self._in_use.pop(request_id, None)
                freed = [] if index is None else [index]
        for index in freed:
            self._free.put(index)

    def _unregister_orphans(self) -> None:
        """Unregister ``histomet_`` regions whose files are gone with their client."""
        status = self._client.get_system_shared_memory_status(
            headers=self._headers, as_json=True
        )
        for name, region in status.get("regions", {}).items():
            key = str(region.get("key", "")).lstrip("/")
            if not name.startswith(_PREFIX) or not key or (_SHM_DIR / key).exists():
                continue
            self._client.unregister_system_shared_memory(name, headers=self._headers)
            _LOGGER.info("unregistered shared memory %s left by a stopped client", name)

    def close(self) -> None:
        """Unregister and destroy every region, logging failures instead of raising."""
        for name in self._registered:
            try:
                self._client.unregister_system_shared_memory(
                    name, headers=self._headers
                )
            except InferenceServerException as error:
                _LOGGER.info("could not unregister shared memory %s: %s", name, error)
        self._registered = []
        for handle in self._handles:
            try:
                system_shm.destroy_shared_memory_region(handle)
            except system_shm.SharedMemoryException as error:
                _LOGGER.info("could not destroy a shared memory region: %s", error)
        self._handles = []

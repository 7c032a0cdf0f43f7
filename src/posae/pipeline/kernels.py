"""The kernel manager the driver gives papermill: a kernel that talks over local sockets and stops quietly.

Two lines that alarm a reader of `make reproduce` come from how jupyter_client starts and stops a
kernel, not from our code, so they are removed there:

- "Kernel is running over TCP without encryption": the default transport is TCP on localhost. A
  kernel that only its own driver talks to needs no network port, so it uses IPC (Unix sockets in
  a private temporary folder), which is also what that warning recommends.
- "KeyboardInterrupt caught in kernel": `shutdown_kernel` sends SIGINT before the shutdown request,
  for kernels stuck in a cell. Papermill shuts a kernel down only once its cells have finished (or
  one has failed), so the interrupt has nothing to stop; the shutdown request, then SIGTERM and
  SIGKILL after `shutdown_wait_time`, still stop a kernel that does not answer.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from traitlets import CaselessStrEnum, default


class QuietKernelManager(AsyncKernelManager):
    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    @default("ip")
    def _ip_default(self) -> str:
        # IPC socket files are named <ip>-<port>; a private folder keeps them out of the working directory.
        self._socket_dir = tempfile.mkdtemp(prefix="posae-kernel-")
        return str(Path(self._socket_dir) / "kernel")

    async def _async_interrupt_kernel(self) -> None:
        if not self.shutting_down:  # a user's interrupt still goes through; the one before shutdown does not
            await super()._async_interrupt_kernel()

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        await super()._async_cleanup_resources(restart=restart)
        if not restart and getattr(self, "_socket_dir", None):
            shutil.rmtree(self._socket_dir, ignore_errors=True)

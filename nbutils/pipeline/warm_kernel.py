"""One Jupyter kernel per process (the runner's, or each Dask worker's), kept warm between the
notebook executions it runs.

A fresh kernel per notebook pays, every time, for starting the kernel, importing torch, pandas
and the project, torch's lazily imported compiler machinery (the optimisers' first step), and
loading the data. A warm kernel pays that once: before each notebook, the kernel is put back
into its start state (:func:`nbutils.pipeline.kernel_state.restore`: a clean namespace and
execution counter, working directory, environment, warning filters, ...), and papermill runs
the notebook in it (``km=``). The executed notebook is the same record as before, numbered
from 1.

Failures stay isolated. The kernel is dropped, and the next notebook starts a fresh one, when:

* the notebook failed (an error in a cell, a trial that failed, a kernel that died);
* the kernel cannot vouch for its state: a notebook rebound an attribute of a project module
  or changed one of torch's global settings (:mod:`~nbutils.pipeline.kernel_state` names it,
  in that execution's ``kernel.log``);
* the process's environment changed since the kernel started (the threads a worker gives its
  kernels, say): the kernel inherited the old one;
* the kernel is no longer alive.

What the kernel process itself prints (ipykernel's logging, not the cells' output) goes to
a file of the process; each execution's share of it is copied beside its executed notebook.
A kernel exits with the process that started it (ipykernel polls its parent), and
:func:`shutdown` stops it at once.

All kernel operations run on one thread of the :class:`WarmKernel` with its own event loop:
the asynchronous kernel manager and its sockets stay on the loop that created them, whichever
thread (a Dask worker's) asks for an execution.
"""
from __future__ import annotations

import ast
import atexit
import json
import logging
import os
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lazy_loader
from jupyter_core.utils import run_sync

# imported on first use (lazy_loader): nbformat's schema checks take seconds to import, Jupyter's
# client a fraction of one (see :mod:`~nbutils.pipeline.execution`)
papermill = lazy_loader.load("papermill")
jupyter_client = lazy_loader.load("jupyter_client")

log = logging.getLogger(__name__)

#: what the notebooks import, imported when a kernel starts so that the start state recorded
#: by :func:`nbutils.pipeline.kernel_state.record` covers these modules
WARM_UP = """\
import logging
import matplotlib
import pandas
import torch
from IPython.display import display
from nbutils.pipeline import batches, examples, steps
from nbutils.report import figures
from nbutils.pipeline import kernel_state
from nbutils.core.device import deterministic_cuda
deterministic_cuda()
kernel_state.record()
del logging, matplotlib, pandas, torch, display, batches, examples, steps, figures, kernel_state, deterministic_cuda
"""

#: evaluated (as a user expression) before each notebook: the problems that make a fresh kernel necessary
RESTORE = "__import__('json').dumps(__import__('nbutils.pipeline.kernel_state', fromlist=['restore']).restore())"

STARTUP_SECONDS = 120   # start and warm-up of a kernel
RESTORE_SECONDS = 30    # restoring a kernel's state between notebooks


class KernelNotClean(RuntimeError):
    """The kernel could not be returned to its start state (the reason is the message)."""


class WarmKernel:
    """A kernel started on first use and reused by :meth:`execute` while it stays clean."""

    def __init__(self, kernel_name: str, cwd: str | Path):
        self.kernel_name = kernel_name
        self.cwd = str(cwd)
        self.environ: dict[str, str] = {}
        self.executions = 0          # notebooks run in the current kernel
        self.started = 0             # kernels started so far
        self._km = None
        self._clients: list = []    # papermill's clients of the current execution
        self._shell = None          # this object's own client of the current kernel
        self._log_fd, self._log_path = tempfile.mkstemp(prefix="nbutils-kernel-", suffix=".log")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="warm-kernel")

    # --- public ---------------------------------------------------------------------------------
    def execute(self, notebook: str | Path, output: str | Path, parameters: dict, kernel_log: Path | None = None,
                **papermill_options: Any) -> None:
        """Run ``notebook`` with ``parameters`` into ``output`` (papermill), in this kernel when it
        is clean, else in a fresh one. Raises what papermill raises; the kernel is then dropped.
        ``kernel_log``: where this execution's share of the kernel's own output goes (written
        only when there is some)."""
        future = self._thread.submit(self._execute, str(notebook), str(output), parameters, kernel_log,
                                     papermill_options)
        try:
            future.result()
        except KeyboardInterrupt:
            self._kill()   # the notebook then fails on its thread; wait for it to let go
            try:
                future.result(timeout=30)
            except BaseException:
                pass
            raise

    @property
    def pid(self) -> int | None:
        """The process id of the current kernel, if one runs."""
        provisioner = getattr(self._km, "provisioner", None)
        process = getattr(provisioner, "process", None)
        return getattr(process, "pid", None)

    def shutdown(self) -> None:
        """Stop the kernel (if any); the object can still start a new one."""
        try:
            self._thread.submit(self._drop).result()
        except RuntimeError:   # at interpreter exit, the thread no longer takes work
            self._kill()

    def close(self) -> None:
        self.shutdown()
        self._thread.shutdown(wait=True)
        try:
            os.close(self._log_fd)
        except OSError:
            pass
        Path(self._log_path).unlink(missing_ok=True)

    # --- on the kernel thread -------------------------------------------------------------------
    def _execute(self, notebook: str, output: str, parameters: dict, kernel_log: Path | None, options: dict) -> None:
        offset = os.fstat(self._log_fd).st_size
        notes = []
        try:
            reason = self._why_fresh()
            if reason:
                if self._km is not None:
                    notes.append(f"[nbutils] fresh kernel: {reason}\n")
                self._drop()
                self._start()
            papermill.execute_notebook(notebook, output, parameters=parameters, kernel_name=self.kernel_name,
                                       km=self._km, cwd=self.cwd, **options)
            self.executions += 1
        except BaseException:
            self._drop()
            raise
        finally:
            self._stop_clients()
            if kernel_log is not None:
                text = "".join(notes) + self._log_since(offset)
                if text:
                    Path(kernel_log).write_text(text)

    def _why_fresh(self) -> str | None:
        """Why the next notebook cannot run in the current kernel (None: it can, and the kernel
        was restored to its start state)."""
        if self._km is None:
            return "no kernel yet"
        if dict(os.environ) != self.environ:
            changed = sorted(k for k in set(os.environ) | set(self.environ) if os.environ.get(k) != self.environ.get(k))
            return "the environment changed (" + ", ".join(changed[:5]) + ")"
        if not self._run_sync(self._km.is_alive)():
            return "the kernel died"
        try:
            problems = self._restore()
        except Exception as e:   # a kernel that does not answer is not worth keeping
            return f"restoring the kernel failed ({type(e).__name__}: {e})"
        return "; ".join(problems) if problems else None

    def _start(self) -> None:
        kernel = self

        class Manager(jupyter_client.AsyncKernelManager):
            """Its kernels write their own output to the process's kernel log; the clients
            papermill creates are stopped after each execution (papermill leaves them open
            when it does not own the kernel)."""

            async def _async_launch_kernel(self, kernel_cmd, **kw):
                kw.setdefault("stdout", kernel._log_fd)
                kw.setdefault("stderr", kernel._log_fd)
                return await super()._async_launch_kernel(kernel_cmd, **kw)

            def client(self, **kw):
                made = super().client(**kw)
                kernel._clients.append(made)
                return made

        self.environ = dict(os.environ)
        km = Manager(kernel_name=self.kernel_name)
        self._run_sync(km.start_kernel)(cwd=self.cwd, extra_arguments=["--HistoryManager.hist_file=:memory:"])
        self._km = km
        self.started += 1
        self.executions = 0
        try:
            reply = self._run_code(WARM_UP, {}, timeout=STARTUP_SECONDS)
            if reply["content"]["status"] != "ok":
                raise RuntimeError("the kernel's warm-up failed: " + reply["content"].get("evalue", "?"))
        except BaseException:
            self._drop()
            raise

    def _restore(self) -> list[str]:
        reply = self._run_code("", {"problems": RESTORE})
        result = reply["content"]["user_expressions"]["problems"]
        if result.get("status") != "ok":
            return [f"restore failed: {result.get('ename')}: {result.get('evalue')}"]
        return json.loads(ast.literal_eval(result["data"]["text/plain"]))   # the repr of a JSON string

    def _run_code(self, code: str, expressions: dict, timeout: float = RESTORE_SECONDS) -> dict:
        """Execute ``code`` silently (no history, no execution count) on the kernel's own client:
        shell channel only, started once per kernel (a client's start waits for the kernel's
        I/O to settle, which papermill's does anyway)."""
        async def run():
            if self._shell is None:   # its own session: clients of one session share a socket identity
                session = jupyter_client.session.Session(key=self._km.session.key, signature_scheme=self._km.session.signature_scheme)
                self._shell = self._km.client(session=session)
                self._clients.remove(self._shell)   # kept across executions
                self._shell.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
            msg_id = self._shell.execute(code, silent=True, store_history=False, user_expressions=expressions)
            while True:
                reply = await self._shell.get_shell_msg(timeout=timeout)
                if reply["parent_header"].get("msg_id") == msg_id:
                    return reply

        return self._run_sync(run)()

    def _stop_clients(self) -> None:
        for client in self._clients:
            try:
                client.stop_channels()
            except Exception:
                pass
        self._clients.clear()

    def _drop(self) -> None:
        km, self._km = self._km, None
        self.executions = 0
        self._stop_clients()
        if self._shell is not None:
            self._clients.append(self._shell)
            self._shell = None
            self._stop_clients()
        if km is None:
            return
        try:
            if km.has_kernel:
                self._run_sync(km.shutdown_kernel)(now=True)
        except Exception as e:
            log.warning("shutting the kernel down failed (%s); killing it", e)
            self._kill(km)
        try:
            self._run_sync(km.cleanup_resources)()
        except Exception:
            pass

    def _kill(self, km=None) -> None:
        """Kill the kernel process at once (from any thread)."""
        provisioner = getattr(km or self._km, "provisioner", None)
        process = getattr(provisioner, "process", None)
        if process is not None and process.poll() is None:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _log_since(self, offset: int) -> str:
        with open(self._log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    @staticmethod
    def _run_sync(coroutine_function):
        return run_sync(coroutine_function)


_kernels: dict[tuple[str, str], WarmKernel] = {}
_lock = threading.Lock()


def kernel_for(kernel_name: str, cwd: str | Path) -> WarmKernel:
    """This process's warm kernel of that name and working directory."""
    with _lock:
        key = (kernel_name, str(cwd))
        if key not in _kernels:
            _kernels[key] = WarmKernel(kernel_name, cwd)
        return _kernels[key]


@atexit.register
def shutdown() -> None:
    """Stop every warm kernel of this process."""
    with _lock:
        kernels = list(_kernels.values())
        _kernels.clear()
    for kernel in kernels:
        kernel.close()

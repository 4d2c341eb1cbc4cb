"""Reward rules in a pool of worker processes.

A rule is ``fn(response_text, row) -> float``. Rules are user code: they may hang, catch
every exception, call ``sys.exit`` or ``os._exit``, crash the interpreter or leak memory.
``RulePool`` runs them in worker processes, so none of that can take the run down or end
it with exit code 0: a rule still running at its time limit has its worker killed, a
worker that dies is replaced, and the batch fails with a ``RewardRuleError`` that names
the rule, the sample (response and row) and the cause. A worker's memory is capped
(``memory_mb``, so a leak fails as ``MemoryError``) and it is the first process the kernel's
OOM killer picks. Nothing is silently turned into a zero.

Workers are fresh interpreters (forking a process that already runs torch or DeepSpeed
threads is unsafe) that import only this module, started on first use and reused across
steps: create one pool per run and
``close()`` it, or use it as a context manager. Rules reach a worker by reference, never
by value: a module-level function is pickled as ``module:qualname`` and imported there;
one defined in a pipeline file (module ``rlflow_pipeline_<hash>``, which no other process
can import) is sent as (file, qualname) and the worker executes that file once, the way
``rlflow.pyfile`` does. A lambda or closure has no reference: it runs in this process with
a ``RuleWarning``, under the weaker SIGALRM time limit (main thread only). Each worker has
its own module state: a rule that counts its calls in a global sees only its worker's.

This module imports no torch, so workers start fast.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import pickle
import signal
import struct
import sys
import time
import traceback
import types
import warnings
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Optional

from rlflow.pyfile import file_of, import_file

DEFAULT_TIMEOUT_S = 10.0  # per call of a rule on one sample
DEFAULT_MEMORY_MB = 4096  # per worker (RLIMIT_DATA)
LOAD_TIMEOUT_S = 120.0  # a new worker's start-up plus importing the rule's module or pipeline file
CHUNKS_PER_WORKER = 4  # a batch is cut into this many chunks per worker; a free worker takes the next


class RewardRuleError(RuntimeError):
    """A reward rule that failed on a sample; the message names the rule, the sample and the cause."""


class RuleWarning(UserWarning):
    """A rule that cannot run in a worker process and runs in this one instead."""


class _RemoteTraceback(Exception):
    """The traceback of a rule that raised in a worker process, shown as the error's cause."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def default_size() -> int:
    """The CPU cores torch does not use: ``max(1, os.cpu_count() - torch threads)``."""
    torch = sys.modules.get("torch")  # never imported here just to ask
    used = torch.get_num_threads() if torch is not None else 1
    return max(1, (os.cpu_count() or 1) - used)


def as_reward(value: Any) -> float:
    """``value`` as a reward: a bool or real number (numpy scalars too) finite in float32.

    Raises ValueError saying what is wrong with it.
    """
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not isinstance(value, numbers.Real) and not numpy_bool:
        raise ValueError(f"returned {value!r} (not a finite number)")
    try:
        v = float(value)
    except OverflowError:  # an int too large for any float
        v = math.inf
    if not math.isfinite(v):
        raise ValueError(f"returned {value!r} (not a finite number)")
    try:
        struct.pack("<f", v)  # standard size: raises where a native cast would give inf
    except OverflowError:
        raise ValueError(f"returned {value!r}, which overflows float32 (not a finite number there)") from None
    return v


def _sample_error(name: str, cause: str, response: str, row: dict) -> RewardRuleError:
    """The error for rule ``name`` failing with ``cause`` on (response, row)."""
    shown = response if len(response) <= 2000 else response[:2000] + f"... ({len(response)} characters)"
    return RewardRuleError(f"reward rule {name!r} {cause} on response {shown!r} for row {row}")


# --- rules by reference ------------------------------------------------------------------


class _RefPickler(pickle.Pickler):
    """Pickles the functions and classes of pipeline files as (file, qualname); refuses ``__main__``'s."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)):
            module = getattr(obj, "__module__", None) or ""
            if module == "__main__":  # a worker would have to run the whole script again
                raise pickle.PicklingError(f"{obj.__qualname__} is defined in __main__")
            file = file_of(module)
            if file and "<" not in obj.__qualname__:
                return _from_file, (file, obj.__qualname__)
        return NotImplemented


def rule_reference(fn: Callable) -> Optional[bytes]:
    """``fn`` pickled by reference for a worker process; None if it has none (a lambda, a closure)."""
    buf = io.BytesIO()
    try:
        _RefPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(fn)
    except (pickle.PicklingError, TypeError, AttributeError):
        return None
    return buf.getvalue()


def _from_file(file: str, qualname: str) -> Any:
    """``qualname`` from the pipeline file ``file``, which runs once per process."""
    obj: Any = import_file(file, fresh=False)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# --- in this process -----------------------------------------------------------------------


class _RuleTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that ``except Exception`` in a rule does not catch it."""


@contextmanager
def _alarm(seconds: float):
    """Raise _RuleTimeout in the block after ``seconds``; no limit outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield  # signals only work in the main thread; elsewhere no limit
        return

    def on_alarm(signum, frame):
        raise _RuleTimeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def score_in_process(name: str, fn: Callable, responses: list[str], rows: list[dict],
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> list[float]:
    """``fn`` on every (response, row) in this process; for debugging and for rules that
    cannot be sent to a worker. The time limit is SIGALRM's (main thread only), and a rule
    that crashes the interpreter takes this process with it."""
    out = []
    for response, row in zip(responses, rows):
        try:
            with _alarm(timeout_s):
                value = fn(response, row)
        except _RuleTimeout:
            raise _sample_error(name, f"hung: still running at its time limit of {timeout_s:g}s", response, row) from None
        except SystemExit as e:
            raise _sample_error(name, f"called sys.exit({e.code!r})", response, row) from None
        except Exception as e:  # the user's code: report what it failed on
            raise _sample_error(name, f"raised {type(e).__name__}: {e}", response, row) from e
        try:
            out.append(as_reward(value))
        except ValueError as e:
            raise _sample_error(name, str(e), response, row) from None
    return out


# --- in a worker process ---------------------------------------------------------------------


def _cap_memory(memory_mb: Optional[int]) -> None:
    """Cap this process's data size (a leak fails as MemoryError) and make it the OOM
    killer's first choice, before the process that trains."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if memory_mb:
        import resource

        limit = memory_mb * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _follow_parent(parent: int, from_main_thread: bool) -> None:
    """End this process when ``parent`` dies, even in the middle of a hung rule.

    The kernel's parent-death signal (Linux) works even while a rule holds the GIL in C
    code, but it fires when the *thread* that started this process ends, so it is only
    asked for when that was the main thread; a watcher thread covers the rest.
    """
    if from_main_thread:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="rlflow-parent-watch").start()


_MEMORY_MB: Optional[int] = None  # in a worker: its memory cap


def _call(fn: Callable, response: str, row: dict) -> tuple:
    """One sample: ("ok", reward) or ("error", cause, traceback text or None)."""
    try:
        value = fn(response, row)
    except SystemExit as e:
        return ("error", f"called sys.exit({e.code!r})", None)
    except BaseException as e:  # the user's code, whatever it raises
        cap = f" (a worker may use {_MEMORY_MB} MiB)" if isinstance(e, MemoryError) and _MEMORY_MB else ""
        return ("error", f"raised {type(e).__name__}{f': {e}' if str(e) else ''}{cap}", traceback.format_exc())
    try:
        return ("ok", as_reward(value))
    except ValueError as e:
        return ("error", str(e), None)


def _worker_main(fd: int, memory_mb: Optional[int], parent: int, from_main_thread: bool) -> None:
    """A worker's loop on the socket ``fd``. It receives (key, pickled rule or None,
    samples) and answers ("go",) once the rule is loaded, then one message per sample,
    stopping at the first error; ("load", cause) if the rule cannot be loaded. None or a
    closed socket ends it."""
    from multiprocessing.connection import Connection

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # one core per worker, should a rule use numpy or torch
    global _MEMORY_MB
    _MEMORY_MB = memory_mb
    _follow_parent(parent, from_main_thread)
    _cap_memory(memory_mb)
    conn = Connection(fd)
    rules: dict[int, Callable] = {}
    try:
        while (msg := conn.recv()) is not None:
            key, blob, samples = msg
            try:
                if key not in rules:
                    rules[key] = pickle.loads(blob)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                conn.send(("load", f"could not be loaded in a worker process ({type(e).__name__}: {e})"))
                continue
            conn.send(("go",))
            for response, row in samples:
                result = _call(rules[key], response, row)
                conn.send(result)
                if result[0] == "error":
                    break
    except (EOFError, OSError):
        return  # the parent is gone


# --- the pool ----------------------------------------------------------------------------------


class _Worker:
    """A worker process: a fresh interpreter (never a fork of this one) with this process's
    ``sys.path``, joined to it by a socket. It ignores Ctrl-C, which is this process's to handle."""

    def __init__(self, memory_mb: Optional[int]):
        import socket
        import subprocess
        import threading
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        args = (theirs.fileno(), memory_mb, os.getpid(), threading.current_thread() is threading.main_thread())
        code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); import sys; "
                f"sys.path[:] = {sys.path!r}; from rlflow.rules import _worker_main; _worker_main(*{args!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()  # once the worker dies, reads here see EOF
        self.conn = Connection(mine.detach())
        try:
            self.sentinel: Optional[int] = os.pidfd_open(self.proc.pid)  # readable once it exits
        except (AttributeError, OSError):
            self.sentinel = None
        self.known: set[int] = set()  # rule keys it has been sent

    def handles(self) -> list:
        return [self.conn] + ([self.sentinel] if self.sentinel is not None else [])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def how_it_died(self) -> str:
        """Its exit code or signal, once it has exited (waiting up to 5 s)."""
        import subprocess

        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def close(self, grace_s: float = 0.0) -> None:
        """Wait up to ``grace_s`` for it to exit, kill it if it has not, free its handles."""
        import subprocess

        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None


@dataclass(eq=False)
class _Job:
    """A chunk [start, stop) of one call, on one worker; ``next`` is the sample it is on."""

    worker: _Worker
    start: int
    stop: int
    deadline: float
    started: bool = False

    def __post_init__(self):
        self.next = self.start


class _Failure(Exception):
    """A failure inside ``RulePool._run``: ``index`` is the sample (None: not one sample)."""

    def __init__(self, index: Optional[int], cause: str, remote_tb: Optional[str] = None, healthy: Optional[_Worker] = None):
        super().__init__(cause)
        self.index, self.cause, self.remote_tb, self.healthy = index, cause, remote_tb, healthy


def _stop(workers: list[_Worker], grace_s: float = 1.0) -> None:
    """Ask ``workers`` to exit, kill those still running after ``grace_s``, and forget them."""
    for w in workers:
        try:
            w.conn.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    for w in workers:
        w.close(max(0.0, deadline - time.monotonic()))
    workers.clear()


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) cut into at most ``parts`` contiguous (start, stop) chunks of near-equal size."""
    step = -(-n // max(1, min(n, parts)))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


class RulePool:
    """Worker processes that score batches with reward rules, in parallel.

    ``size`` workers (default ``default_size()``; 0 runs every rule in this process, for
    debugging); each call of a rule on one sample is limited to ``timeout_s`` seconds and
    each worker's data to ``memory_mb`` MiB (None: no cap). Workers start on the first
    ``score`` (or ``start()``) and live until ``close()``, the pool's garbage collection or
    the interpreter's exit; a worker that fails is replaced on the next call.

        with RulePool(size=4, timeout_s=5) as pool:
            rewards = pool.score("exact", exact_match, responses, rows)
    """

    def __init__(self, size: Optional[int] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_mb: Optional[int] = DEFAULT_MEMORY_MB):
        self.size = default_size() if size is None else int(size)
        if self.size < 0 or not timeout_s > 0:
            raise ValueError(f"RulePool needs size >= 0 and timeout_s > 0, got size={size}, timeout_s={timeout_s}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._workers: list[_Worker] = []
        self._keys: dict[bytes, int] = {}  # a number per rule reference, so each worker loads a rule once
        self._warned: set[str] = set()
        self._finalizer = weakref.finalize(self, _stop, self._workers)

    def __enter__(self) -> "RulePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. The pool stays usable: a later ``score`` starts new ones."""
        _stop(self._workers)

    def start(self) -> None:
        """Start the missing workers now (``score`` does it), so start-up overlaps other work."""
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self.memory_mb))

    def score(self, name: str, fn: Callable, responses: list[str], rows: list[dict],
              timeout_s: Optional[float] = None) -> list[float]:
        """``fn(response, row)`` for every sample, in the workers; one float per sample.

        Raises RewardRuleError naming the rule, a failing sample and the cause: an
        exception, ``sys.exit``, a return that is not a number finite in float32, the time
        limit (``timeout_s``, default the pool's; the worker is killed) or the death of the
        worker (its exit code or signal). A rule without a module-level reference (a
        lambda, a closure) runs in this process, with a RuleWarning the first time.
        """
        if len(responses) != len(rows):
            raise ValueError(f"{len(responses)} responses but {len(rows)} rows")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        blob = rule_reference(fn) if self.size else None
        if blob is None:
            if self.size and name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"reward rule {name!r} ({fn!r}) cannot be sent to a worker process (only module-level functions "
                              "of an importable module or of the pipeline file can; not a lambda, a closure or a function "
                              "of __main__), so it runs in this process, where a crash or exit in it ends the run",
                              RuleWarning, stacklevel=2)
            return score_in_process(name, fn, responses, rows, timeout)
        if not responses:
            return []
        return self._run(name, self._keys.setdefault(blob, len(self._keys)), blob, responses, rows, timeout)

    def _run(self, name: str, key: int, blob: bytes, responses: list[str], rows: list[dict], timeout: float) -> list[float]:
        """Deal the batch out in chunks to free workers until every sample is scored."""
        self.start()
        out = [0.0] * len(responses)
        pending = deque(_chunks(len(responses), self.size * CHUNKS_PER_WORKER))
        idle, jobs, healthy = list(self._workers), [], None
        try:
            while pending or jobs:
                while idle and pending:
                    jobs.append(self._send(idle.pop(), key, blob, responses, rows, *pending.popleft()))
                wait([h for j in jobs for h in j.worker.handles()],
                     timeout=max(0.0, min(j.deadline for j in jobs) - time.monotonic()))
                for job in [j for j in jobs if self._advance(j, out, timeout)]:
                    jobs.remove(job)
                    idle.append(job.worker)
        except _Failure as f:
            healthy = f.healthy
            if f.index is None:
                raise RewardRuleError(f"reward rule {name!r} {f.cause}") from None
            remote = _RemoteTraceback(f.remote_tb) if f.remote_tb else None
            raise _sample_error(name, f.cause, responses[f.index], rows[f.index]) from remote
        finally:
            self._discard([j.worker for j in jobs if j.worker is not healthy])  # what they would still send is stale
        return out

    def _send(self, w: _Worker, key: int, blob: bytes, responses: list[str], rows: list[dict], start: int, stop: int) -> _Job:
        """Give ``w`` the samples [start, stop), and the rule itself if it has not had it."""
        try:
            w.conn.send((key, None if key in w.known else blob, list(zip(responses[start:stop], rows[start:stop]))))
        except OSError:
            how = w.how_it_died()
            self._discard([w])
            raise _Failure(None, f"could not be sent to a worker process: {how}") from None
        w.known.add(key)
        return _Job(w, start, stop, deadline=time.monotonic() + LOAD_TIMEOUT_S)

    @staticmethod
    def _advance(job: _Job, out: list[float], timeout: float) -> bool:
        """Take what ``job``'s worker has sent; True once its chunk is done. Raises _Failure."""
        alive = job.worker.alive()  # before reading: a worker's last words come before its death
        try:
            while job.worker.conn.poll():
                msg = job.worker.conn.recv()
                if msg[0] == "ok":
                    out[job.next] = msg[1]
                    job.next += 1
                elif msg[0] == "error":  # the worker is fine: it stopped the chunk and waits for the next
                    raise _Failure(job.next, msg[1], msg[2], healthy=job.worker)
                elif msg[0] == "load":
                    raise _Failure(None, msg[1], healthy=job.worker)
                job.started = True
                job.deadline = time.monotonic() + timeout
                if job.next == job.stop:
                    return True
        except (EOFError, OSError):
            alive = False
        if not alive:
            raise _Failure(job.next, f"took down its worker process: {job.worker.how_it_died()}")
        if time.monotonic() < job.deadline:
            return False
        job.worker.proc.kill()
        if not job.started:
            raise _Failure(None, f"was not loaded by a worker process within {LOAD_TIMEOUT_S:g}s (the worker was killed)")
        raise _Failure(job.next, f"hung: still running at its time limit of {timeout:g}s, so its worker process was killed")

    def _discard(self, workers: list[_Worker]) -> None:
        """Kill ``workers`` and drop them from the pool (``start`` replaces them)."""
        for w in workers:
            w.close()
            self._workers.remove(w)

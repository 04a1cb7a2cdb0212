r"""Run untrusted Python programs (model-written code) in a sandbox; success is a token, not an exit code.

``Sandbox.run(program)`` runs one program in a fresh process and returns a :class:`Result` whose
``passed`` is True only when the program's top-level code ran to completion without raising. For
code rewards the program is ``prompt + completion + tests + check(entry_point)``
(``jaxrlhf.tasks.code``). ``Sandbox.run_many`` runs a batch on a bounded thread pool.

How a program runs (each layer is a guarantee where the OS allows it; docs/rewards.md has the
threat model and what was tested):

1. The trainer spawns ``unshare ... python -I -c LAUNCHER`` with ``start_new_session=True`` (its own
   session and process group), stdin ``/dev/null``, stdout discarded, stderr to a file in a fresh
   temporary directory, and an **empty environment**. The configuration (program, a random
   per-run token, limits) goes through a pipe, never through argv or the environment.
2. The launcher sets the resource limits (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC``,
   ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core files) on itself before anything else; every process
   below inherits them. (They are not set in a ``preexec_fn``: that is unsafe in a multi-threaded
   parent such as a JAX trainer or this pool; the launcher is a fresh single-threaded process.)
3. **Namespaces** (isolation level ``"namespaces"``): the launcher is PID 1 of new PID, network,
   mount, IPC and UTS namespaces (plus a user namespace when the trainer is not root). It makes the
   whole mount tree read-only, nosuid and nodev (``mount_setattr(AT_RECURSIVE)``), mounts a private
   size-limited tmpfs on ``/tmp`` (the program's working directory is ``/tmp/work`` in it) and a
   fresh ``/proc``. The network namespace has only a loopback device that is down: no connection
   to anything. When the launcher (PID 1) exits or is killed, the kernel kills every process left
   in the namespace: nothing survives a run.
4. The program runs in a child of the launcher that drops privileges for good: as root, to an
   unprivileged uid/gid picked at random for this run (``RLIMIT_NPROC`` is per uid, so it bounds
   forks; root ignores it); otherwise into a nested user namespace as a non-zero uid (no
   capabilities). ``PR_SET_NO_NEW_PRIVS`` is set (no setuid binaries), all file descriptors but
   stdio and the result pipe are closed, and a fresh ``python -I`` interpreter runs the program
   with ``exec`` in a fresh globals dict.
5. **Success**: after ``exec`` returned normally, the harness writes the per-run token to the
   result pipe. A program that exits early (``sys.exit``, ``os._exit``, ``SystemExit``), raises,
   hangs, is killed by a limit, or prints anything (stdout is not the channel) gives no token.
6. The trainer waits at most ``timeout`` seconds (wall clock), then kills the process group
   (``SIGKILL``); on every exit path (normal, timeout, an exception in the trainer) the group is
   killed, with ``isolation="process"`` every process of the run's uid is killed too, and the
   temporary directory is removed. If the trainer dies, the launcher sees its pipe close and ends
   the run.

Fallback (isolation level ``"process"``: ``unshare`` or namespaces unavailable, e.g. an
unprivileged container): steps 1, 2, 4 (uid drop when root), 5 and 6 hold; there is no network
isolation, and the filesystem is protected only by the dropped uid's permissions (none when the
trainer is not root). The level in force is logged once per process; ``require_isolation=True``
(or ``JAXRLHF_SANDBOX_REQUIRE_ISOLATION=1`` for the default sandbox) refuses to run without
namespaces.

Threat model, honestly: the token is unguessable and never printed, so no program can forge a
pass by printing or by exiting 0. But the program runs in the *same interpreter* as the harness
that writes the token after it: a program written on purpose to read the token out of the
interpreter's memory (frames, ``gc``) and write it to the result pipe itself would be scored as a
pass. The sandbox protects the machine from such a program; it does not make the *score* robust
against code that attacks the harness deliberately. Tests that a weak ``check`` lets pass (e.g. an
object whose ``__eq__`` is always True) are a property of the tests, not of the sandbox.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import marshal
import math
import os
import random
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

log = logging.getLogger("jaxrlhf.sandbox")

ISOLATION_LEVELS = ("namespaces", "process")
UID_BASE = 1_900_000_000  # sandbox uids (root only): UID_BASE + random in [0, UID_SPAN)
UID_SPAN = 1 << 20
_NESTED_UID = 1000  # uid of the program inside its nested user namespace (non-root trainers)
_TOKEN_BYTES = 16

# ---------------------------------------------------------------------------------------------
# Code run in the sandbox. LAUNCHER: trusted, first process (PID 1 of the namespaces); RUNNER: the
# interpreter that executes the untrusted program, after the privilege drop.
# ---------------------------------------------------------------------------------------------

_LAUNCHER = r"""
import ctypes, marshal, os, resource, signal, sys, threading
cfg_fd = int(sys.argv[1])
cfg_file = os.fdopen(cfg_fd, "rb", buffering=0)

def read_exactly(n):
    out = b""
    while len(out) < n:
        chunk = cfg_file.read(n - len(out))
        if not chunk:
            os._exit(3)
        out += chunk
    return out

cfg = marshal.loads(read_exactly(int.from_bytes(read_exactly(8), "little")))
lim = cfg["limits"]
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (lim["memory"], lim["memory"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
libc = ctypes.CDLL(None, use_errno=True)

def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")

def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")

class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)

def read_only_tree():
    attr = MountAttr(0x1 | 0x2 | 0x4, 0, 0, 0)  # MOUNT_ATTR_RDONLY | NOSUID | NODEV
    ret = libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret == 0:
        return
    # Kernels before 5.12 (no mount_setattr): remount every mount read-only, deepest last.
    points = []
    with open("/proc/self/mountinfo") as f:
        for row in f:
            parts = row.split()
            opts = parts[5].split(",")
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
            flags |= MS_NOEXEC if "noexec" in opts else 0
            points.append((parts[4].replace("\\040", " "), flags))
    for point, flags in points:
        mount(None, point, None, flags)

if cfg["isolate"]:
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    read_only_tree()
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={lim['tmpfs']},mode=1777")
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:
        print(f"sandbox: fresh /proc not mounted ({e}); host processes stay visible, not reachable",
              file=sys.stderr)

run_r, run_w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.close(run_w)
        os.set_inheritable(run_r, True)
        os.set_inheritable(cfg["result_fd"], True)
        uid = cfg["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        elif cfg["isolate"]:  # not root: a nested user namespace with a non-zero uid, no capabilities
            check(libc.unshare(0x10000000), "unshare(CLONE_NEWUSER)")
            for name, text in (("setgroups", "deny"), ("uid_map", f"{cfg['nested_uid']} 0 1"),
                               ("gid_map", f"{cfg['nested_uid']} 0 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        work = cfg["workdir"]
        if cfg["isolate"]:
            work = "/tmp/work"
            os.mkdir(work, 0o700)
        os.chdir(work)
        low = 3
        for fd in sorted({run_r, cfg["result_fd"]}):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)
        argv = [cfg["python"], "-I", "-c", cfg["runner"], str(run_r), str(cfg["result_fd"])]
        os.execve(cfg["python"], argv, {})
    except BaseException as e:
        try:
            print(f"sandbox: cannot start the program: {e!r}", file=sys.stderr)
        finally:
            os._exit(4)
os.close(run_r)
os.close(cfg["result_fd"])
os.write(run_w, bytes.fromhex(cfg["token"]) + cfg["program"].encode("utf-8", "surrogatepass"))
os.close(run_w)
del cfg["program"], cfg["token"]

def lifeline():  # the trainer holds the other end; EOF means it is gone: end the run
    while cfg_file.read(1 << 16):
        pass
    os.kill(pid, signal.SIGKILL)
    if cfg["uid"] is not None and not cfg["isolate"] and os.fork() == 0:
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # kill(-1): every process of the run's uid
        for _ in range(100):
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                break
        os._exit(0)
    os._exit(5)

threading.Thread(target=lifeline, daemon=True).start()
while True:
    try:
        done, status = os.wait()
    except ChildProcessError:
        os._exit(6)
    if done == pid:
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""

_RUNNER = r"""
import os, sys
def _harness():
    fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    data = bytearray()
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    token, program = bytes(data[:TOKEN_BYTES]), data[TOKEN_BYTES:].decode("utf-8", "surrogatepass")
    del data
    write, exit_, base = os.write, os._exit, BaseException
    del sys.argv[1:]
    try:
        code = compile(program, "<program>", "exec")
        del program
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except base:
        try:
            import traceback
            traceback.print_exc()
        except base:
            pass
        exit_(1)
    try:
        write(result_fd, token)
    finally:
        exit_(0)
_harness()
""".replace("TOKEN_BYTES", str(_TOKEN_BYTES))


# ---------------------------------------------------------------------------------------------
# Results and the sandbox
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of one program.

    Attributes:
      passed: the token came back: the program ran to completion.
      status: ``"passed"``, ``"failed"`` (exited without the token: an exception, an early exit, a
        limit), ``"timeout"`` (killed at the wall-clock timeout).
      returncode: of the launcher (the program's exit code when it exited; negative: a signal).
      seconds: wall-clock time of the run.
      stderr: the last ``stderr_bytes`` of the program's (and launcher's) standard error.
      uid: the uid the program ran as (host view), None when it kept the trainer's.
    """

    passed: bool
    status: str
    returncode: int | None
    seconds: float
    stderr: str
    uid: int | None


def _world_runnable(path: str) -> bool:
    """Whether every directory on ``path``'s resolved path is searchable and the file executable by
    anyone (an unprivileged uid must exec it)."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts)):
        d = os.sep.join(parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return False
    mode = os.stat(real).st_mode
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


def _default_python(as_other_user: bool) -> str:
    if not as_other_user or _world_runnable(sys.executable):
        return sys.executable
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(cand) and _world_runnable(cand):
            return cand
    raise RuntimeError(
        f"sandbox: {sys.executable} is not executable by an unprivileged uid (a parent directory is "
        "not world-searchable) and no /usr/bin/python3 is; pass Sandbox(python=...)"
    )


_ISOLATION: dict[tuple, tuple[str, str]] = {}
_ISOLATION_LOCK = threading.Lock()
_UIDS_IN_USE: set[int] = set()
_UIDS_LOCK = threading.Lock()


class IsolationUnavailable(RuntimeError):
    """``require_isolation=True`` but the OS does not give the sandbox its namespaces."""


class Sandbox:
    """Runs programs in isolated, resource-limited processes (see the module docstring).

    Args:
      timeout: wall-clock seconds per program (the CPU-time limit is ``ceil(timeout) + 1``).
      workers: programs run in parallel by ``run_many`` (default: the CPU count, at most 32).
      memory_bytes: address-space limit (``RLIMIT_AS``) of every process of a run.
      max_processes: ``RLIMIT_NPROC`` of the run's uid (processes and threads).
      max_file_bytes: largest file a run may write (``RLIMIT_FSIZE``).
      max_open_files: ``RLIMIT_NOFILE``.
      tmpfs_bytes: size of the private ``/tmp`` (isolation ``"namespaces"``).
      require_isolation: raise :class:`IsolationUnavailable` instead of running without namespaces.
      isolate: ``None`` = namespaces when available; ``False`` forces the ``"process"`` level.
      python: interpreter of the program (default: this one, or the system ``python3`` when this one
        is not executable by the unprivileged uid).
      stderr_bytes: how much of the program's stderr a :class:`Result` keeps.
    """

    def __init__(
        self,
        timeout: float = 10.0,
        workers: int | None = None,
        *,
        memory_bytes: int = 1 << 30,
        max_processes: int = 32,
        max_file_bytes: int = 16 << 20,
        max_open_files: int = 64,
        tmpfs_bytes: int = 64 << 20,
        require_isolation: bool = False,
        isolate: bool | None = None,
        python: str | None = None,
        stderr_bytes: int = 4096,
    ):
        if timeout <= 0:
            raise ValueError(f"Sandbox timeout must be > 0 seconds, got {timeout}")
        self.timeout = float(timeout)
        self.workers = max(1, min(32, workers or os.cpu_count() or 1))
        self.limits = dict(
            cpu=int(math.ceil(self.timeout)) + 1,
            memory=int(memory_bytes),
            nproc=int(max_processes),
            fsize=int(max_file_bytes),
            nofile=int(max_open_files),
            tmpfs=int(tmpfs_bytes),
        )
        self.require_isolation = bool(require_isolation)
        self.root = os.geteuid() == 0
        self.python = python or _default_python(as_other_user=self.root)
        self.unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
        self.stderr_bytes = int(stderr_bytes)
        self._isolate_request = isolate
        self._isolation: tuple[str, str] | None = None

    # ---- isolation level --------------------------------------------------------------------
    @property
    def isolation(self) -> str:
        """``"namespaces"`` or ``"process"`` (probed once per process and configuration, logged once).

        Raises:
          IsolationUnavailable: with ``require_isolation=True`` when namespaces do not work here.
        """
        if self._isolation is None:
            self._isolation = self._probe()
        level, why = self._isolation
        if self.require_isolation and level != "namespaces":
            raise IsolationUnavailable(
                f"sandbox: require_isolation=True but Linux namespaces are unavailable here ({why}); "
                "programs would run with process-level limits only"
            )
        return level

    def _probe(self) -> tuple[str, str]:
        key = (self.unshare, self.python, self.root, self._isolate_request)
        with _ISOLATION_LOCK:
            if key not in _ISOLATION:
                level, why = (
                    "process",
                    "isolate=False" if self._isolate_request is False else "no unshare binary",
                )
                if self.unshare and self._isolate_request is not False:
                    res = self._run_once("pass", isolate=True, timeout=max(self.timeout, 20.0))
                    level = "namespaces" if res.passed else "process"
                    why = res.stderr.strip()[-300:] or res.status
                if level == "process":
                    res = self._run_once("pass", isolate=False, timeout=max(self.timeout, 20.0))
                    if not res.passed:  # a broken sandbox would score every program 0, silently
                        raise RuntimeError(
                            f"sandbox: cannot run a trivial program ({res.status}, exit {res.returncode}, "
                            f"python {self.python}): {res.stderr.strip()[-500:]}"
                        )
                if level == "namespaces":
                    log.info(
                        "sandbox isolation: namespaces (pid, net, mount, ipc, uts%s; read-only root, "
                        "private /tmp, %s)",
                        "" if self.root else ", user",
                        "unprivileged uid" if self.root else "nested user namespace",
                    )
                else:
                    log.warning(
                        "sandbox isolation: process only (%s): resource limits, own process group, "
                        "empty environment%s; NO network or filesystem isolation. "
                        "Set require_isolation=True to refuse this.",
                        why,
                        ", unprivileged uid" if self.root else "",
                    )
                _ISOLATION[key] = (level, why)
            return _ISOLATION[key]

    # ---- running ----------------------------------------------------------------------------
    def run(self, program: str) -> Result:
        """Runs one program (Python source); see :class:`Result`."""
        return self._run_once(program, isolate=self.isolation == "namespaces", timeout=self.timeout)

    def run_many(self, programs: Sequence[str]) -> list[Result]:
        """Runs ``programs`` on a pool of ``workers`` threads; results in input order."""
        isolate = self.isolation == "namespaces"
        if len(programs) <= 1 or self.workers == 1:
            return [self._run_once(p, isolate=isolate, timeout=self.timeout) for p in programs]
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox") as pool:
            return list(
                pool.map(lambda p: self._run_once(p, isolate=isolate, timeout=self.timeout), programs)
            )

    def _command(self, isolate: bool, cfg_fd: int) -> list[str]:
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(cfg_fd)]
        if not isolate:
            return launcher
        flags = ["--pid", "--net", "--mount", "--ipc", "--uts", "--fork", "--kill-child"]
        if not self.root:
            flags = ["--user", "--map-root-user", *flags]
        return [self.unshare, *flags, "--", *launcher]

    def _nproc(self, uid: int | None) -> int:
        if uid is not None or self.root:
            return self.limits["nproc"]
        # Without a uid of its own RLIMIT_NPROC counts every task of the trainer's uid.
        return self.limits["nproc"] + _count_tasks(os.getuid())

    def _run_once(self, program: str, *, isolate: bool, timeout: float) -> Result:
        uid = _acquire_uid() if self.root else None
        tmp = tempfile.mkdtemp(prefix="jaxrlhf-sandbox-")
        cfg_r = cfg_w = res_r = res_w = None
        proc = None
        start = time.monotonic()
        try:
            os.chmod(tmp, 0o711)  # the uid may enter work/ (its own), not list the directory
            work = os.path.join(tmp, "work")
            os.mkdir(work, 0o700)
            if uid is not None:
                os.chown(work, uid, uid)
            cfg_r, cfg_w = os.pipe()
            res_r, res_w = os.pipe()
            cfg = {
                "limits": {**self.limits, "nproc": self._nproc(uid)},
                "isolate": isolate,
                "uid": uid,
                "nested_uid": _NESTED_UID,
                "workdir": work,
                "python": self.python,
                "runner": _RUNNER,
                "result_fd": res_w,
                "token": (token := secrets.token_bytes(_TOKEN_BYTES)).hex(),
                "program": program,
            }
            with open(os.path.join(tmp, "stderr"), "wb") as err:
                proc = subprocess.Popen(
                    self._command(isolate, cfg_r),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env={},
                    cwd=tmp,
                    start_new_session=True,
                    pass_fds=(cfg_r, res_w),
                )
            os.close(cfg_r)
            os.close(res_w)
            cfg_r = res_w = None
            blob = marshal.dumps(cfg)  # trusted parent -> launcher; plain str/int/bool/None values
            _write_all(cfg_w, len(blob).to_bytes(8, "little") + blob, start + timeout)
            del cfg
            timed_out = not _wait_exit(proc, start + timeout)
            _kill_group(proc)
            returncode = None if timed_out else proc.returncode
            got = _read_available(res_r)
            passed = (not timed_out) and got == token
            if timed_out:
                status = "timeout"
            else:
                status = "passed" if passed else "failed"
            return Result(
                passed=passed,
                status=status,
                returncode=returncode,
                seconds=time.monotonic() - start,
                stderr=_tail(os.path.join(tmp, "stderr"), self.stderr_bytes),
                uid=uid,
            )
        finally:
            if proc is not None:
                _kill_group(proc)
            for fd in (cfg_r, cfg_w, res_r, res_w):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if uid is not None:
                _kill_uid(uid)
                _release_uid(uid)
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Process and uid helpers
# ---------------------------------------------------------------------------------------------


def _acquire_uid() -> int:
    with _UIDS_LOCK:
        while True:
            uid = UID_BASE + random.randrange(UID_SPAN)
            if uid not in _UIDS_IN_USE:
                _UIDS_IN_USE.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _UIDS_LOCK:
        _UIDS_IN_USE.discard(uid)


def _pids_of_uid(uid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid == uid:
                out.append(int(name))
        except OSError:
            pass
    return out


def _kill_uid(uid: int, rounds: int = 50) -> None:
    """SIGKILLs every process of ``uid`` (the run's own uid) until none is left."""
    for _ in range(rounds):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    log.error("sandbox: processes of uid %d survive %d kill rounds", uid, rounds)


def _count_tasks(uid: int) -> int:
    n = 0
    for pid in _pids_of_uid(uid):
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{pid}/task"))
    return n


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILLs the run's process group (the launcher's session), then reaps the launcher.

    Only before the reap: until then the launcher (maybe a zombie) holds its pid, so the group id
    cannot have been reused by an unrelated process."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("sandbox: launcher %d did not exit after SIGKILL", proc.pid)


def _wait_exit(proc: subprocess.Popen, deadline: float) -> bool:
    """Whether the launcher exited before ``deadline`` (``time.monotonic``), **without reaping it**
    (see ``_kill_group``). Waits on a pidfd where the OS has one, else polls ``waitid(WNOWAIT)``."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.005)
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    try:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        os.close(fd)
    return bool(ready)


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    """Writes ``data`` to the launcher's pipe, giving up at ``deadline`` (``time.monotonic``)."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view and time.monotonic() < deadline:
            select.select([], [fd], [], max(0.0, min(0.1, deadline - time.monotonic())))
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass  # the launcher died early (it reports on stderr)


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while len(out) <= _TOKEN_BYTES:
            chunk = os.read(fd, 64)
            if not chunk:
                break
            out += chunk
    except BlockingIOError:
        pass
    return out


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""

"""Type stubs of the compiled module `dsec._native` (import the API from `dsec`)."""

from os import PathLike
from typing import Any, final

INIT_BINARY_BYTES: int

class SandboxError(Exception):
    """Base class of every dsec error."""

class SandboxSetupError(SandboxError):
    """The sandbox could not be created with the requested isolation."""

class PolicyError(SandboxError, ValueError):
    """An invalid limit or argument (also a ValueError); the message names the field and value."""

class PathError(SandboxError):
    """A file API path is invalid, escapes the sandbox root, or cannot be read/written."""

class SandboxClosedError(SandboxError):
    """The sandbox is closed."""

@final
class ExecResult:
    """The result of one `exec` or `run_python` call. A failing program is data, not an error."""

    @property
    def exit_code(self) -> int | None:
        """Exit status when the program exited normally, else None."""
    @property
    def signal(self) -> int | None:
        """Signal that killed the program (9 on timeout), else None."""
    @property
    def stdout(self) -> bytes:
        """Captured stdout: all of it, or head and tail halves of `max_output_bytes`."""
    @property
    def stderr(self) -> bytes:
        """Captured stderr, bounded like stdout."""
    @property
    def timed_out(self) -> bool:
        """The wall-clock timeout fired; the call's whole process tree was killed."""
    @property
    def oom_killed(self) -> bool:
        """The kernel OOM-killed a process of the sandbox during the call."""
    @property
    def stdout_truncated(self) -> bool: ...
    @property
    def stderr_truncated(self) -> bool: ...
    @property
    def stdout_total(self) -> int:
        """Bytes the program wrote to stdout (kept or not)."""
    @property
    def stderr_total(self) -> int: ...
    @property
    def wall_time(self) -> float:
        """Seconds from start to the end of the call."""
    @property
    def cpu_time(self) -> float:
        """User + system CPU seconds of the call's process tree."""
    @property
    def peak_memory(self) -> int:
        """Peak memory of the sandbox's cgroup during the call, bytes (best effort)."""
    @property
    def ok(self) -> bool:
        """exit_code == 0 and not timed_out."""

class Sandbox:
    """A persistent sandbox (namespaces, read-only root, seccomp, landlock, cgroup).

    Defaults: memory_bytes=512 MiB, max_pids=256, cpu_seconds=None (unlimited, per call),
    timeout=30.0 s, max_output_bytes=1 MiB per stream, disk_bytes=256 MiB (/workspace and /tmp
    each), max_open_files=1024, network=False (private loopback-only netns), image=None (the
    host's /usr, /bin, /lib*), env=None, require_landlock=True (refuse to start without it).
    Invalid values raise PolicyError naming the field.
    """

    def __new__(
        cls,
        *,
        memory_bytes: int | None = None,
        max_pids: int | None = None,
        cpu_seconds: float | None = None,
        timeout: float | None = None,
        max_output_bytes: int | None = None,
        disk_bytes: int | None = None,
        max_open_files: int | None = None,
        network: bool | None = None,
        image: str | PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        require_landlock: bool | None = None,
        cpus: float | None = None,
        uid_range: tuple[int, int] | None = None,
        snapshot: str | PathLike[str] | None = None,
        _handoff: Sandbox | None = None,
    ) -> Sandbox: ...
    def exec(
        self,
        cmd: str | list[str] | tuple[str, ...],
        *,
        timeout: float | None = None,
        stdin: bytes | bytearray | str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> ExecResult:
        """Runs `cmd` (str: via /bin/sh -c; list: argv, PATH-searched). stdin is /dev/null
        unless data is given; cwd defaults to /workspace (relative: beneath it). The call
        returns at the deadline with the whole process tree killed. Ctrl-C (KeyboardInterrupt)
        cancels the call inside the sandbox and is re-raised; the sandbox stays usable."""
    def run_python(self, code: str | bytes, *, timeout: float | None = None) -> ExecResult:
        """Runs Python source in the sandbox's warm interpreter; each call is a fresh fork."""
    def read_file(self, path: str | PathLike[str], *, max_bytes: int | None = None) -> bytes:
        """Reads a regular file beneath the sandbox root (relative paths: beneath /workspace).
        The file streams in 1 MiB chunks (the sandbox never holds it whole); PathError names
        the size when it is larger than ``max_bytes`` (default and at most 1 GiB)."""
    def write_file(
        self, path: str | PathLike[str], data: bytes | bytearray | str, *, parents: bool = False
    ) -> None:
        """Creates or replaces a regular file beneath the sandbox root, streamed in 1 MiB
        chunks; PathError when the path escapes the root, is read-only, its directory does
        not exist (``parents=True`` creates missing directories, mode 0755, each resolved
        beneath the root like the file), or the data does not fit its mount (the error
        names the limit)."""
    def _export_workspace(self, dest: str | PathLike[str]) -> dict[str, int]:
        """Copies /workspace into the empty host directory `dest` (dirs, files, symlinks and
        modes; fifos, sockets and devices skipped); returns the counts. Used by
        dsec.Sandbox.snapshot."""
    def spawn(
        self,
        cmd: str | list[str] | tuple[str, ...],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Process:
        """Starts `cmd` in the background (str: via /bin/sh -c) and returns at once. It runs
        with the confinement of `exec` and inside the sandbox's memory, pids and CPU limits
        (each process also gets RLIMIT_CPU = cpu_seconds; there is no timeout), until it
        exits, is killed, or the sandbox closes. stdin is /dev/null; output is kept in the
        sandbox (its memory) until read, at most disk_bytes per stream over its life."""
    def reset(self) -> None:
        """Readies the sandbox for a new user (SandboxPool calls it between users): kills
        every background process and the warm Python server, empties /workspace, /tmp and
        /dev/shm, removes System V IPC objects; namespaces, cgroup, uid and limits stay. A
        sandbox started from a snapshot gets an empty /workspace (the pool re-forks those)."""
    def close(self) -> None:
        """Kills every process of the sandbox and removes its mounts and cgroup. Idempotent."""
    @property
    def closed(self) -> bool: ...
    @property
    def pid(self) -> int:
        """Host pid of the sandbox's init (pid 1 inside)."""
    @property
    def limits(self) -> dict[str, Any]:
        """The effective limits."""
    def __enter__(self) -> Sandbox: ...
    def __exit__(self, *args: object) -> bool: ...

@final
class Process:
    """A background process started by `Sandbox.spawn`. When it exits, everything it started
    is killed with it (its own pid namespace); all of them die with the sandbox. Methods
    other than the properties ask the sandbox, and raise SandboxClosedError once it closed.
    """

    def poll(self) -> int | None:
        """None while it runs, else its return code (exit status, or -signal)."""
    def wait(self, timeout: float | None = None) -> int:
        """Waits until it exits; returns its return code. TimeoutError after `timeout`
        seconds (it keeps running). Other calls on the sandbox proceed meanwhile."""
    def kill(self) -> None:
        """SIGKILLs it and everything it started; returns once they are gone. No-op once it
        exited. Output written so far stays readable."""
    def read_stdout(self, max_bytes: int | None = None) -> bytes:
        """Stdout written since the last read, at most `max_bytes` (default
        max_output_bytes); b"" when there is nothing new. Does not wait."""
    def read_stderr(self, max_bytes: int | None = None) -> bytes:
        """Like read_stdout, for stderr."""
    @property
    def returncode(self) -> int | None:
        """Return code as last seen by poll/wait/kill, else None."""
    @property
    def exit_code(self) -> int | None: ...
    @property
    def signal(self) -> int | None:
        """Signal that ended it (9 after kill()), else None."""
    @property
    def cpu_time(self) -> float | None:
        """CPU seconds of the processes it waited for, once it exited."""
    @property
    def args(self) -> list[str]: ...
    @property
    def id(self) -> int:
        """Its id within the sandbox."""

def check() -> dict[str, Any]:
    """Probes which isolation features this kernel enforces (creates one real sandbox)."""

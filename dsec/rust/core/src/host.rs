//! The host side of a sandbox: spawns the init (from a sealed memfd or an executable path),
//! creates the cgroup, speaks the control protocol, and tears everything down on close.

use crate::cgroup::SandboxCgroup;
use crate::init::outer_config;
use crate::policy::{check_env, check_timeout, Policy};
use crate::wire::{self, tag, Dec, Enc};
use crate::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Where the init binary comes from.
pub enum InitImage {
    /// The binary's bytes, written once per process into a sealed memfd and executed from it.
    Bytes(&'static [u8]),
    /// An executable path plus environment (tests run their own binary as the init).
    Exe(String, Vec<(String, String)>),
}

fn memfd_path(bytes: &'static [u8]) -> Result<String> {
    static FD: OnceLock<std::result::Result<RawFd, String>> = OnceLock::new();
    let fd = FD.get_or_init(|| {
        let err = |w: &str| format!("{w}: {}", std::io::Error::last_os_error());
        // SAFETY: creating and filling a memfd we own.
        unsafe {
            let fd = libc::memfd_create(
                c"dsec-init".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            );
            if fd < 0 {
                return Err(err("memfd_create"));
            }
            crate::sys::write_all_fd(fd, bytes).map_err(|e| format!("write memfd: {e}"))?;
            let seals =
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
            if libc::fcntl(fd, libc::F_ADD_SEALS, seals) != 0 {
                return Err(err("seal memfd"));
            }
            // execve refuses files open for writing: keep a read-only descriptor only.
            let path = format!("/proc/self/fd/{fd}\0");
            let ro = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
            if ro < 0 {
                return Err(err("reopen memfd"));
            }
            libc::close(fd);
            Ok(ro)
        }
    });
    fd.clone()
        .map(|fd| format!("/proc/self/fd/{fd}"))
        .map_err(Error::Setup)
}

/// The launcher of this host process (see `init::launcher`): started once per image, forks
/// one outer init per sandbox.
struct Launcher {
    prog: String,
    sock: UnixStream,
    child: std::process::Child,
}

/// The launcher of one process. A forked child must not lock its parent's mutex (another thread
/// of the parent, e.g. one starting a warm spare, may have held it at the fork, and that thread
/// does not exist in the child), so each process makes its own slot on first use; the parent's,
/// copied into the child, is left alone (its socket belongs to the parent's launcher).
struct Slot {
    owner: u32,
    launcher: Mutex<Option<Launcher>>,
}

static SLOT: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());

fn slot() -> &'static Slot {
    let me = std::process::id();
    loop {
        let cur = SLOT.load(Ordering::Acquire);
        // SAFETY: a non-null SLOT points to a leaked Box, never freed.
        if let Some(s) = unsafe { cur.as_ref() } {
            if s.owner == me {
                return s;
            }
        }
        let new = Box::into_raw(Box::new(Slot {
            owner: me,
            launcher: Mutex::new(None),
        }));
        match SLOT.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: `new` is ours and now published for good.
            Ok(_) => return unsafe { &*new },
            // SAFETY: `new` was never published; another thread made this process's slot.
            Err(_) => drop(unsafe { Box::from_raw(new) }),
        }
    }
}

fn start_launcher(prog: &str, env: &[(String, String)]) -> Result<Launcher> {
    let (sock, theirs) =
        UnixStream::pair().map_err(|e| Error::Setup(format!("socketpair: {e}")))?;
    let mut cmd = Command::new(prog);
    cmd.env_clear()
        .envs(env.iter().cloned())
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // It exits when this process closes its socket (or exits); reaped when replaced.
    let child = cmd
        .spawn()
        .map_err(|e| Error::Setup(format!("spawn init: {e}")))?;
    let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
    Ok(Launcher {
        prog: prog.to_string(),
        sock,
        child,
    })
}

/// Starts an outer init: returns the host end of its control socket and a pidfd of it.
fn launch(prog: &str, env: &[(String, String)], cfg: &[u8]) -> Result<(UnixStream, OwnedFd)> {
    let mut g = slot().launcher.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..2 {
        match g.take() {
            Some(l) if l.prog == prog => *g = Some(l),
            Some(mut l) => {
                drop(l.sock);
                let _ = l.child.wait();
            }
            None => {}
        }
        if g.is_none() {
            *g = Some(start_launcher(prog, env)?);
        }
        let Some(l) = g.as_ref() else { continue };
        let (mut sock, theirs) =
            UnixStream::pair().map_err(|e| Error::Setup(format!("socketpair: {e}")))?;
        wire::write_frame(&mut sock, cfg).map_err(|e| Error::Setup(format!("send config: {e}")))?;
        let fd = l.sock.as_raw_fd();
        let answer = crate::sys::send_fd(fd, 1, Some(theirs.as_raw_fd()))
            .and_then(|_| crate::sys::recv_fd(fd));
        drop(theirs);
        match answer {
            Ok(Some((1, Some(pidfd)))) => {
                // SAFETY: recv_fd handed us this descriptor; nothing else owns it.
                return Ok((sock, unsafe { OwnedFd::from_raw_fd(pidfd) }));
            }
            Ok(Some((_, fd))) => {
                crate::sys::close(fd.unwrap_or(-1));
                return Err(Error::Setup("the init launcher could not fork".into()));
            }
            // The launcher is gone (killed, or an earlier failure): reap it, start a fresh one.
            _ => {
                if let Some(mut l) = g.take() {
                    let _ = l.child.kill();
                    let _ = l.child.wait();
                }
            }
        }
    }
    Err(Error::Setup("the init launcher does not answer".into()))
}

/// A host uid held by one live sandbox: an exclusive `flock` on a per-uid file, which the
/// kernel drops when the holder closes it or exits, so uids are reused only after close,
/// across every process on this machine that creates sandboxes.
struct UidLease {
    _file: std::fs::File,
}

fn lease_dir() -> std::path::PathBuf {
    for d in ["/run/dsec-uids", "/dev/shm/dsec-uids"] {
        let p = std::path::Path::new(d);
        if std::fs::create_dir_all(p).is_ok() {
            return p.to_path_buf();
        }
    }
    std::env::temp_dir().join("dsec-uids")
}

/// Takes a free uid of `(first, count)`, starting at a point that differs per process.
fn lease_uid((first, count): (u32, u32)) -> Result<(u32, UidLease)> {
    use std::os::unix::fs::OpenOptionsExt;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = lease_dir();
    let _ = std::fs::create_dir_all(&dir);
    let start = (std::process::id().wrapping_mul(2_654_435_761))
        .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
    for i in 0..count {
        let uid = first + start.wrapping_add(i) % count;
        let path = dir.join(format!("{uid}"));
        let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
        else {
            continue;
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok((uid, UidLease { _file: f }));
        }
    }
    Err(Error::Setup(format!(
        "no free host uid in uid_range ({first}, {count}) under {}: every uid is held by a \
         live sandbox",
        dir.display()
    )))
}

/// Largest config frame written before the outer init runs (larger ones follow its start).
const PREWRITE_MAX: usize = 32 << 10;

/// Waits until the process behind `pidfd` has exited, at most `ms` milliseconds (-1: no
/// limit); returns whether it exited.
fn wait_pidfd(pidfd: &OwnedFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let end = crate::sys::now() + f64::from(ms.max(0)) / 1e3;
    loop {
        let left = if ms < 0 {
            -1
        } else {
            ((end - crate::sys::now()) * 1e3).max(0.0) as i32
        };
        // SAFETY: p is a valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left) };
        if n > 0 {
            return true;
        }
        if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// Sends SIGKILL to the process behind `pidfd`.
fn signal_kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal with a pidfd we own.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// SIGKILLs the process behind `pidfd` and waits for it (bounded).
fn kill_pidfd(pidfd: &OwnedFd) {
    signal_kill(pidfd);
    wait_pidfd(pidfd, 10_000);
}

/// How long close() lets the init exit on its own after end of stream, then after the kill.
const CLOSE_GRACE_MS: i32 = 2_000;
const CLOSE_KILL_MS: i32 = 5_000;

pub use crate::init::files::MAX_READ;

/// Largest stdin, file or code payload one call carries.
pub const MAX_PAYLOAD: usize = 1 << 30;

fn check_payload(what: &str, n: usize) -> Result<()> {
    if n > MAX_PAYLOAD {
        return Err(Error::Policy(format!(
            "{what} is {n} bytes; at most {MAX_PAYLOAD} bytes per call"
        )));
    }
    Ok(())
}

/// Polled while a call waits; returning true cancels the call.
pub type Interrupt<'a> = &'a (dyn Fn() -> bool + Sync);

/// One exec request.
#[derive(Clone, Debug, Default)]
pub struct ExecRequest {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    pub cwd: Option<Vec<u8>>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Option<f64>,
}

/// The result of an exec or run_python call.
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    pub oom_killed: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub stdout_total: u64,
    pub stderr_total: u64,
    pub wall_time: f64,
    pub cpu_time: f64,
    pub peak_memory: u64,
}

/// `(exit_code, signal)` of a raw wait status; `None` (killed before it reported) is SIGKILL.
fn decode_status(status: Option<i32>) -> (Option<i32>, Option<i32>) {
    match status {
        None => (None, Some(libc::SIGKILL)),
        Some(s) if libc::WIFEXITED(s) => (Some(libc::WEXITSTATUS(s)), None),
        Some(s) if libc::WIFSIGNALED(s) => (None, Some(libc::WTERMSIG(s))),
        Some(_) => (None, None),
    }
}

/// What one poll of a background process found.
#[derive(Clone, Debug, Default)]
pub struct ProcessState {
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Output written since the previous read (at most the requested bytes).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Bytes written to each stream so far.
    pub stdout_total: u64,
    pub stderr_total: u64,
    /// CPU seconds of its tree, once it exited.
    pub cpu_time: f64,
    /// It exited and all of its output was read: the sandbox forgot it.
    pub drained: bool,
}

/// What the host measured around one call.
#[derive(Default)]
struct CallStats {
    oom: u64,
    peak: u64,
    /// CPU seconds of the sandbox's cgroup during the call.
    cpu: Option<f64>,
    /// The call was killed for using up `cpu_seconds`.
    cpu_exceeded: bool,
}

struct Inner {
    sock: Option<UnixStream>,
    /// Whether the outer init still has to be waited for.
    child: bool,
}

/// A live sandbox. Calls on one sandbox serialise; different sandboxes run in parallel.
pub struct Sandbox {
    inner: Mutex<Inner>,
    policy: Policy,
    pid: u32,
    /// The process that created the sandbox; a forked copy must not use or tear it down.
    owner: u32,
    /// Set once closed; readable without the call mutex.
    closed: AtomicBool,
    /// pidfd of the outer init: it exits after it reaped the inner init (which a pid
    /// namespace's init does only once every process in the namespace is gone) and removed
    /// the cgroups. Outside the call mutex so close() can kill a sandbox whose call runs.
    outer: OwnedFd,
    /// pidfd of the inner init (pid 1 of the sandbox): killing it ends the pid namespace.
    init: Option<OwnedFd>,
    /// The sandbox's cgroup(s): last resort of close() is to kill every task in them.
    cg: SandboxCgroup,
    /// The host uid this sandbox maps to, held until the sandbox is dropped.
    _uid: Option<UidLease>,
}

impl Sandbox {
    /// Creates a sandbox: cgroup, init process, namespaces, root. Blocks until it is ready.
    pub fn new(mut policy: Policy, image: &InitImage) -> Result<Self> {
        policy.validate()?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        // An unprivileged caller can only map its own uid (and has its own budgets).
        let (uid, lease) = if euid == 0 {
            let (u, l) = lease_uid(policy.uid_range)?;
            (u, Some(l))
        } else {
            (euid, None)
        };
        policy.host_id = uid;
        let (prog, env) = match image {
            InitImage::Bytes(b) => (memfd_path(b)?, Vec::new()),
            InitImage::Exe(p, env) => (p.clone(), env.clone()),
        };
        let cg = SandboxCgroup::create(&crate::cgroup::Limits {
            memory_bytes: policy.memory_bytes,
            max_pids: policy.max_pids,
            cpus: policy.cpus,
            tcp_bytes: policy.tcp_bytes(),
        })?;
        let fail = |cg: &SandboxCgroup, e: Error| {
            cg.remove();
            e
        };
        // The config waits in the socket, so the outer init reads it the moment it starts.
        let cfg = outer_config(&policy, &cg.dirs);
        let (mut sock, mut child) = match launch(&prog, &env, &cfg) {
            Ok(p) => p,
            Err(e) => return Err(fail(&cg, e)),
        };
        let abort = |child: &mut OwnedFd, cg: &SandboxCgroup, e: Error| {
            kill_pidfd(child);
            cg.remove();
            e
        };
        let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
        if cfg.len() > PREWRITE_MAX {
            if let Err(e) = wire::write_frame(&mut sock, &cfg) {
                let e = Error::Setup(format!("send config: {e}"));
                return Err(abort(&mut child, &cg, e));
            }
        }
        // One frame answers the config: READY with the host pid of pid 1, or an error.
        let body = match wire::read_frame(&mut sock) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(abort(
                    &mut child,
                    &cg,
                    Error::Setup("init exited during setup".into()),
                ))
            }
            Err(e) => return Err(abort(&mut child, &cg, Error::Setup(format!("init: {e}")))),
        };
        let mut d = Dec::new(&body);
        let pid = match d.u8() {
            Ok(tag::READY) => d.u32().unwrap_or(0),
            Ok(tag::ERROR) => {
                let e = wire::decode_error(&mut d);
                return Err(abort(&mut child, &cg, e));
            }
            _ => {
                return Err(abort(
                    &mut child,
                    &cg,
                    Error::Setup("unexpected frame from init".into()),
                ))
            }
        };
        let init = crate::sys::pidfd_open(pid as libc::pid_t)
            .ok()
            // SAFETY: a fresh pidfd nothing else owns.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Sandbox {
            inner: Mutex::new(Inner {
                sock: Some(sock),
                child: true,
            }),
            policy,
            pid,
            owner: std::process::id(),
            closed: AtomicBool::new(false),
            outer: child,
            init,
            cg,
            _uid: lease,
        })
    }

    /// The policy this sandbox enforces.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether the CPU bandwidth limit (`cpus`) is in force (needs a cgroup cpu controller).
    pub fn cpu_limited(&self) -> bool {
        self.cg.cpu_limited
    }

    /// Host pid of the in-sandbox init (pid 1 of the sandbox).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether `close` has run (or the init died).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The call mutex, for the process that created the sandbox only. The owner is checked
    /// first: in a forked child the mutex may be held for good (by a parent thread).
    fn owned_lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        if std::process::id() != self.owner {
            return Err(Error::Sandbox(
                "this sandbox belongs to the process that created it (used after fork)".into(),
            ));
        }
        Ok(self.lock())
    }

    /// Closes the sandbox in bounded time: a running call is killed (it returns
    /// `SandboxClosedError`), the init sees end of stream and exits, the kernel kills every
    /// process in its pid namespace, the outer init removes the cgroup. An init that does not
    /// exit within a grace period is SIGKILLed with every task of the sandbox's cgroup.
    /// Idempotent.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if std::process::id() != self.owner {
            // A forked copy: drop our descriptors only; the owner's sandbox lives on. The lock
            // may be held for good (a parent thread's call at the fork): then keep them.
            if let Ok(mut g) = self.inner.try_lock() {
                g.sock = None;
            }
            return;
        }
        let mut g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                // A call holds the mutex: kill the sandbox so that call returns now.
                self.kill_all();
                self.lock()
            }
        };
        self.teardown(&mut g);
    }

    /// SIGKILLs pid 1 of the sandbox (the kernel then kills its whole pid namespace) and
    /// every task left in its cgroup.
    fn kill_all(&self) {
        if let Some(fd) = &self.init {
            signal_kill(fd);
        }
        self.cg.kill();
    }

    fn teardown(&self, g: &mut Inner) {
        if let Some(s) = g.sock.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if std::mem::take(&mut g.child) && !wait_pidfd(&self.outer, CLOSE_GRACE_MS) {
            self.kill_all();
            if !wait_pidfd(&self.outer, CLOSE_KILL_MS) {
                signal_kill(&self.outer);
                wait_pidfd(&self.outer, CLOSE_GRACE_MS);
            }
        }
        self.cg.remove();
    }

    fn call(
        &self,
        body: &[u8],
        timeout: f64,
        accounting: bool,
        interrupt: Interrupt<'_>,
    ) -> Result<(Vec<u8>, CallStats)> {
        let mut g = self.owned_lock()?;
        let Some(sock) = g.sock.as_mut() else {
            return Err(Error::Closed);
        };
        let _ = sock.set_read_timeout(Some(Duration::from_secs_f64(timeout + 30.0)));
        let cg = &self.cg;
        let oom0 = if accounting {
            cg.reset_peak();
            cg.oom_kills()
        } else {
            0
        };
        let cpu0 = cg.cpu_usage().filter(|_| accounting);
        let budget = self.policy.cpu_seconds.filter(|_| accounting);
        let over_budget = || match (cpu0, budget, cg.cpu_usage()) {
            (Some(c0), Some(b), Some(c)) => c - c0 >= b as f64,
            _ => false,
        };
        let sock = g.sock.as_mut().ok_or(Error::Closed)?;
        let mut cancelled = false;
        let mut cpu_exceeded = false;
        let r = wire::write_frame(sock, body).and_then(|_| {
            let limit = crate::sys::now() + timeout + 30.0;
            let mut p = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            loop {
                // SAFETY: p is a valid pollfd.
                let n = unsafe { libc::poll(&mut p, 1, 100) };
                let eintr =
                    n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
                if (n != 0 && !eintr) || crate::sys::now() >= limit {
                    break;
                }
                if !cancelled && !cpu_exceeded && interrupt() {
                    wire::write_frame(sock, &[wire::tag::CANCEL])?;
                    cancelled = true;
                }
                // The whole call's CPU budget: the call's tree is killed like a cancel, and
                // the result says SIGXCPU.
                if !cancelled && !cpu_exceeded && over_budget() {
                    wire::write_frame(sock, &[wire::tag::CANCEL])?;
                    cpu_exceeded = true;
                }
            }
            wire::read_frame(sock)
        });
        match r {
            Ok(Some(_)) if cancelled => Err(Error::Interrupted),
            Ok(Some(b)) => {
                let stats = if accounting {
                    CallStats {
                        oom: cg.oom_kills().saturating_sub(oom0),
                        peak: cg.peak(),
                        cpu: cpu0.and_then(|c0| Some(cg.cpu_usage()? - c0)),
                        cpu_exceeded,
                    }
                } else {
                    CallStats::default()
                };
                Ok((b, stats))
            }
            _ if self.is_closed() => {
                self.teardown(&mut g);
                Err(Error::Closed)
            }
            other => {
                self.teardown(&mut g);
                self.closed.store(true, Ordering::Release);
                let why = match other {
                    Err(e) => e.to_string(),
                    _ => "end of stream".into(),
                };
                Err(Error::Sandbox(format!(
                    "the sandbox init died ({why}); the sandbox is closed"
                )))
            }
        }
    }

    fn timeout(&self, t: Option<f64>) -> Result<f64> {
        let t = t.unwrap_or(self.policy.timeout);
        check_timeout("timeout", t)?;
        Ok(t)
    }

    /// Runs a command. A failing command is a result; a sandbox failure is an error.
    pub fn exec(&self, req: &ExecRequest) -> Result<ExecOutput> {
        self.exec_with(req, &|| false)
    }

    /// [`Sandbox::exec`] that polls `interrupt` about every 100 ms while waiting; when it
    /// returns true the call is cancelled inside the sandbox (its whole tree is killed) and
    /// `Error::Interrupted` is returned. The sandbox stays usable.
    pub fn exec_with(&self, req: &ExecRequest, interrupt: Interrupt<'_>) -> Result<ExecOutput> {
        let timeout = self.timeout(req.timeout)?;
        let body = self.encode_exec(tag::EXEC, req, timeout)?;
        self.result(&body, timeout, interrupt)
    }

    /// Validates an exec or spawn request and encodes it.
    fn encode_exec(&self, t: u8, req: &ExecRequest, timeout: f64) -> Result<Vec<u8>> {
        if req.argv.is_empty() {
            return Err(Error::Policy("cmd must not be empty".into()));
        }
        for (i, a) in req.argv.iter().enumerate() {
            if a.contains(&0) {
                return Err(Error::Policy(format!(
                    "cmd[{i}] contains a NUL byte: {:?}",
                    String::from_utf8_lossy(a)
                )));
            }
        }
        for (k, v) in &req.env {
            check_env("env", k, v)?;
        }
        let cwd = match &req.cwd {
            None => b"/workspace".to_vec(),
            Some(c) if c.contains(&0) || c.is_empty() => {
                return Err(Error::Policy(format!(
                    "cwd is invalid: {:?}",
                    String::from_utf8_lossy(c)
                )))
            }
            Some(c) if c[0] == b'/' => c.clone(),
            Some(c) => [&b"/workspace/"[..], c].concat(),
        };
        check_payload("stdin", req.stdin.as_ref().map_or(0, Vec::len))?;
        let mut e = Enc::new(t);
        e.list(&req.argv)
            .list(&self.policy.environment(&req.env))
            .bytes(&cwd);
        e.opt_bytes(req.stdin.as_deref())
            .u64((timeout * 1e3).ceil() as u64);
        e.u64(self.policy.max_output_bytes)
            .u64(self.policy.cpu_seconds.unwrap_or(0));
        Ok(e.0)
    }

    /// Starts a background process (see `init::procs`): it runs until it exits, is killed or
    /// the sandbox closes, with the sandbox's confinement and inside its limits (each process
    /// also gets `RLIMIT_CPU` = `cpu_seconds`). stdin is /dev/null. Returns its id.
    pub fn spawn(&self, req: &ExecRequest) -> Result<u32> {
        if req.stdin.is_some() {
            return Err(Error::Policy(
                "stdin is not supported by spawn (a background process reads /dev/null)".into(),
            ));
        }
        let body = self.encode_exec(tag::SPAWN, req, 0.0)?;
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        self.exchange(|sock| {
            wire::write_frame(sock, &body)?;
            let resp = wire::read_frame(sock)?.ok_or_else(|| bad("end of stream".into()))?;
            let mut d = Dec::new(&resp);
            match d.u8()? {
                tag::OK => Ok(Ok(d.u32()?)),
                tag::ERROR => Ok(Err(wire::decode_error(&mut d))),
                t => Err(bad(format!("unexpected frame {t}"))),
            }
        })?
    }

    /// Polls (`kill`: first SIGKILLs the tree of) background process `id` and reads at most
    /// `max_stdout`/`max_stderr` new bytes of its output.
    pub fn process(
        &self,
        id: u32,
        kill: bool,
        max_stdout: u64,
        max_stderr: u64,
    ) -> Result<ProcessState> {
        for (n, v) in [("max_stdout", max_stdout), ("max_stderr", max_stderr)] {
            if v > MAX_READ {
                return Err(Error::Policy(format!(
                    "{n} must be at most {MAX_READ}, got {v}"
                )));
            }
        }
        let mut e = Enc::new(tag::PROC_OP);
        e.u32(id).u8(u8::from(kill)).u64(max_stdout).u64(max_stderr);
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        self.exchange(|sock| {
            wire::write_frame(sock, &e.0)?;
            let resp = wire::read_frame(sock)?.ok_or_else(|| bad("end of stream".into()))?;
            let mut d = Dec::new(&resp);
            match d.u8()? {
                tag::PROC => {}
                tag::ERROR => return Ok(Err(wire::decode_error(&mut d))),
                t => return Err(bad(format!("unexpected frame {t}"))),
            }
            let running = d.u8()? != 0;
            let has = d.u8()? != 0;
            let status = d.i64()? as i32;
            let mut s = ProcessState {
                running,
                stdout: d.bytes()?,
                stderr: d.bytes()?,
                stdout_total: d.u64()?,
                stderr_total: d.u64()?,
                cpu_time: f64::from_bits(d.u64()?),
                drained: d.u8()? != 0,
                ..Default::default()
            };
            if !running {
                (s.exit_code, s.signal) = decode_status(has.then_some(status));
            }
            Ok(Ok(s))
        })?
    }

    /// Waits for background process `id` to exit, at most `timeout` seconds (None: no limit),
    /// polling with a growing pause (1 ms to 50 ms) and without holding the sandbox between
    /// polls. Returns its final state, or `None` on timeout. `interrupt` as in
    /// [`Sandbox::exec_with`] (returns `Error::Interrupted`; the process keeps running).
    pub fn wait_process(
        &self,
        id: u32,
        timeout: Option<f64>,
        interrupt: Interrupt<'_>,
    ) -> Result<Option<ProcessState>> {
        if let Some(t) = timeout {
            check_timeout("timeout", t)?;
        }
        let end = timeout.map(|t| crate::sys::now() + t);
        let mut pause = 0.001;
        loop {
            let s = self.process(id, false, 0, 0)?;
            if !s.running {
                return Ok(Some(s));
            }
            let now = crate::sys::now();
            if end.is_some_and(|e| now >= e) {
                return Ok(None);
            }
            if interrupt() {
                return Err(Error::Interrupted);
            }
            let left = end.map_or(pause, |e| (e - now).max(0.0));
            std::thread::sleep(Duration::from_secs_f64(pause.min(left)));
            pause = (pause * 2.0).min(0.05);
        }
    }

    /// Runs Python code in the sandbox's warm interpreter (a fork per call).
    pub fn run_python(&self, code: &[u8], timeout: Option<f64>) -> Result<ExecOutput> {
        self.run_python_with(code, timeout, &|| false)
    }

    /// [`Sandbox::run_python`] with an interrupt poll (see [`Sandbox::exec_with`]).
    pub fn run_python_with(
        &self,
        code: &[u8],
        timeout: Option<f64>,
        interrupt: Interrupt<'_>,
    ) -> Result<ExecOutput> {
        let timeout = self.timeout(timeout)?;
        check_payload("code", code.len())?;
        let mut e = Enc::new(tag::PYTHON);
        e.bytes(code).u64((timeout * 1e3).ceil() as u64);
        e.u64(self.policy.max_output_bytes)
            .u64(self.policy.cpu_seconds.unwrap_or(0));
        self.result(&e.0, timeout, interrupt)
    }

    fn result(&self, body: &[u8], timeout: f64, interrupt: Interrupt<'_>) -> Result<ExecOutput> {
        let (resp, stats) = self.call(body, timeout, true, interrupt)?;
        let mut d = Dec::new(&resp);
        let bad = |e: std::io::Error| Error::Sandbox(format!("bad result frame: {e}"));
        match d.u8().map_err(bad)? {
            tag::RESULT => {}
            tag::ERROR => return Err(wire::decode_error(&mut d)),
            t => return Err(Error::Sandbox(format!("unexpected frame {t}"))),
        }
        let has = d.u8().map_err(bad)? != 0;
        let status = d.i64().map_err(bad)? as i32;
        let timed_out = d.u8().map_err(bad)? != 0;
        let mut o = ExecOutput {
            stdout: d.bytes().map_err(bad)?,
            stderr: d.bytes().map_err(bad)?,
            stdout_truncated: d.u8().map_err(bad)? != 0,
            stderr_truncated: d.u8().map_err(bad)? != 0,
            stdout_total: d.u64().map_err(bad)?,
            stderr_total: d.u64().map_err(bad)?,
            wall_time: f64::from_bits(d.u64().map_err(bad)?),
            cpu_time: f64::from_bits(d.u64().map_err(bad)?),
            timed_out,
            oom_killed: stats.oom > 0,
            peak_memory: stats.peak,
            ..Default::default()
        };
        if let Some(c) = stats.cpu {
            // Every process of the call, reaped or killed (the init's own share is tiny).
            o.cpu_time = c;
        }
        if stats.cpu_exceeded {
            o.exit_code = None;
            o.signal = Some(libc::SIGXCPU);
        } else {
            (o.exit_code, o.signal) = decode_status(has.then_some(status));
        }
        Ok(o)
    }

    /// Runs one file-API exchange on the control socket (under the call mutex). An I/O
    /// failure means the init is gone: the sandbox is torn down and closed.
    fn exchange<T>(&self, f: impl FnOnce(&mut UnixStream) -> std::io::Result<T>) -> Result<T> {
        let mut g = self.owned_lock()?;
        let Some(sock) = g.sock.as_mut() else {
            return Err(Error::Closed);
        };
        let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
        match f(sock) {
            Ok(v) => Ok(v),
            Err(_) if self.is_closed() => {
                self.teardown(&mut g);
                Err(Error::Closed)
            }
            Err(e) => {
                self.teardown(&mut g);
                self.closed.store(true, Ordering::Release);
                Err(Error::Sandbox(format!(
                    "the sandbox init died ({e}); the sandbox is closed"
                )))
            }
        }
    }

    /// Reads a regular file beneath the sandbox root (relative paths: beneath /workspace).
    /// The file streams in chunks; one larger than `max_bytes` (default and at most
    /// [`MAX_READ`]) is refused with a `Path` error naming both sizes.
    pub fn read_file(&self, path: &[u8], max_bytes: Option<u64>) -> Result<Vec<u8>> {
        check_path(path)?;
        let max = max_bytes.unwrap_or(MAX_READ);
        if max > MAX_READ {
            return Err(Error::Policy(format!(
                "max_bytes must be at most {MAX_READ}, got {max}"
            )));
        }
        let mut e = Enc::new(tag::READ);
        e.bytes(path).u64(max);
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        self.exchange(|sock| {
            wire::write_frame(sock, &e.0)?;
            let mut out = Vec::new();
            loop {
                let body = wire::read_frame(sock)?.ok_or_else(|| bad("end of stream".into()))?;
                let mut d = Dec::new(&body);
                match d.u8()? {
                    tag::DATA => {
                        let more = d.u8()? != 0;
                        out.extend_from_slice(&d.bytes()?);
                        if out.len() as u64 > max {
                            return Err(bad("the init sent more than max_bytes".into()));
                        }
                        if !more {
                            return Ok(Ok(out));
                        }
                    }
                    tag::ERROR => return Ok(Err(wire::decode_error(&mut d))),
                    t => return Err(bad(format!("unexpected frame {t}"))),
                }
            }
        })?
    }

    /// Creates or replaces a regular file beneath the sandbox root. The data streams in
    /// chunks; what does not fit the mount is a `Path` error naming the limit. With
    /// `parents`, missing directories above it are created first (mode 0755).
    pub fn write_file(&self, path: &[u8], data: &[u8], parents: bool) -> Result<()> {
        check_path(path)?;
        check_payload("data", data.len())?;
        let mut e = Enc::new(tag::WRITE);
        e.bytes(path).u64(data.len() as u64).u8(u8::from(parents));
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let answer = |sock: &mut UnixStream| -> std::io::Result<Result<()>> {
            let body = wire::read_frame(sock)?.ok_or_else(|| bad("end of stream".into()))?;
            let mut d = Dec::new(&body);
            match d.u8()? {
                tag::OK => Ok(Ok(())),
                tag::ERROR => Ok(Err(wire::decode_error(&mut d))),
                t => Err(bad(format!("unexpected frame {t}"))),
            }
        };
        self.exchange(|sock| {
            wire::write_frame(sock, &e.0)?;
            if let Err(e) = answer(sock)? {
                return Ok(Err(e));
            }
            for chunk in data.chunks(crate::init::files::CHUNK) {
                let mut f = Enc::new(tag::DATA);
                f.bytes(chunk);
                wire::write_frame(sock, &f.0)?;
            }
            answer(sock)
        })?
    }

    /// Copies this sandbox's /workspace into the empty host directory `dest` (see
    /// [`crate::snapshot`]). No call runs meanwhile (the call mutex is held); background
    /// processes keep running, so what they write during the copy may or may not be in it.
    pub fn export_workspace(&self, dest: &std::path::Path) -> Result<crate::snapshot::Exported> {
        let g = self.owned_lock()?;
        if g.sock.is_none() || self.is_closed() {
            return Err(Error::Closed);
        }
        let r = crate::snapshot::export(self.pid, dest);
        drop(g);
        r
    }

    /// Resets the sandbox for a new user: every background process and the warm Python
    /// server are killed, /workspace, /tmp and /dev/shm emptied, System V IPC objects
    /// removed; namespaces, cgroup, uid and limits stay (see `init::reset`). A sandbox
    /// started from a snapshot gets an empty /workspace, not the snapshot's files.
    pub fn reset(&self) -> Result<()> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        self.exchange(|sock| {
            wire::write_frame(sock, &[tag::RESET])?;
            let resp = wire::read_frame(sock)?.ok_or_else(|| bad("end of stream".into()))?;
            let mut d = Dec::new(&resp);
            match d.u8()? {
                tag::OK => Ok(Ok(())),
                tag::ERROR => Ok(Err(wire::decode_error(&mut d))),
                t => Err(bad(format!("unexpected frame {t}"))),
            }
        })?
    }

    /// Raw fd of the control socket (posture tests: it must not leak into the sandbox).
    pub fn control_fd(&self) -> Option<RawFd> {
        self.lock().sock.as_ref().map(|s| s.as_raw_fd())
    }
}

/// Validates a file API path: non-empty, no NUL; escapes are judged by the kernel (openat2).
pub fn check_path(path: &[u8]) -> Result<()> {
    if path.is_empty() {
        return Err(Error::Path("path must not be empty".into()));
    }
    if path.contains(&0) {
        return Err(Error::Path(format!(
            "path {:?} contains a NUL byte",
            String::from_utf8_lossy(path)
        )));
    }
    Ok(())
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.close();
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Sandbox>();
}

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
use std::sync::atomic::{AtomicBool, Ordering};
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
    owner: u32,
    prog: String,
    sock: UnixStream,
    child: std::process::Child,
}

static LAUNCHER: Mutex<Option<Launcher>> = Mutex::new(None);

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
        owner: std::process::id(),
        prog: prog.to_string(),
        sock,
        child,
    })
}

/// Starts an outer init: returns the host end of its control socket and a pidfd of it.
fn launch(prog: &str, env: &[(String, String)], cfg: &[u8]) -> Result<(UnixStream, OwnedFd)> {
    let mut g = LAUNCHER.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..2 {
        let me = std::process::id();
        match g.take() {
            Some(l) if l.owner == me && l.prog == prog => *g = Some(l),
            Some(mut l) if l.owner == me => {
                drop(l.sock);
                let _ = l.child.wait();
            }
            // A launcher inherited through fork belongs to the parent: leave its socket alone.
            Some(l) if l.owner != me => std::mem::forget(l),
            _ => {}
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

/// Largest config frame written before the outer init runs (larger ones follow its start).
const PREWRITE_MAX: usize = 32 << 10;

/// Waits until the process behind `pidfd` has exited.
fn wait_pidfd(pidfd: &OwnedFd) {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is a valid pollfd; retried on EINTR.
    while unsafe { libc::poll(&mut p, 1, -1) } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
}

/// SIGKILLs the process behind `pidfd` and waits for it.
fn kill_pidfd(pidfd: &OwnedFd) {
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
    wait_pidfd(pidfd);
}

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

struct Inner {
    sock: Option<UnixStream>,
    /// pidfd of the outer init: it exits after it reaped the inner init (which a pid
    /// namespace's init does only once every process in the namespace is gone) and removed
    /// the cgroups.
    child: Option<OwnedFd>,
    cg: Option<SandboxCgroup>,
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
}

impl Sandbox {
    /// Creates a sandbox: cgroup, init process, namespaces, root. Blocks until it is ready.
    pub fn new(policy: Policy, image: &InitImage) -> Result<Self> {
        policy.validate()?;
        let (prog, env) = match image {
            InitImage::Bytes(b) => (memfd_path(b)?, Vec::new()),
            InitImage::Exe(p, env) => (p.clone(), env.clone()),
        };
        let cg = SandboxCgroup::create(policy.memory_bytes, policy.max_pids)?;
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
        Ok(Sandbox {
            inner: Mutex::new(Inner {
                sock: Some(sock),
                child: Some(child),
                cg: Some(cg),
            }),
            policy,
            pid,
            owner: std::process::id(),
            closed: AtomicBool::new(false),
        })
    }

    /// The policy this sandbox enforces.
    pub fn policy(&self) -> &Policy {
        &self.policy
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

    /// Closes the sandbox: the init sees end of stream and exits, the kernel kills every
    /// process in its pid namespace, the outer init removes the cgroup. Idempotent.
    pub fn close(&self) {
        let mut g = self.lock();
        self.closed.store(true, Ordering::Release);
        if std::process::id() != self.owner {
            // A forked copy: drop our descriptors only; the owner's sandbox lives on.
            g.sock = None;
            g.child = None;
            g.cg = None;
            return;
        }
        Self::teardown(&mut g);
    }

    fn teardown(g: &mut Inner) {
        if let Some(s) = g.sock.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(c) = g.child.take() {
            wait_pidfd(&c);
        }
        if let Some(cg) = g.cg.take() {
            cg.remove();
        }
    }

    fn call(
        &self,
        body: &[u8],
        timeout: f64,
        accounting: bool,
        interrupt: Interrupt<'_>,
    ) -> Result<(Vec<u8>, u64, u64)> {
        let mut g = self.lock();
        if std::process::id() != self.owner {
            return Err(Error::Sandbox(
                "this sandbox belongs to the process that created it (used after fork)".into(),
            ));
        }
        let Some(sock) = g.sock.as_mut() else {
            return Err(Error::Closed);
        };
        let _ = sock.set_read_timeout(Some(Duration::from_secs_f64(timeout + 30.0)));
        let oom0 = match (&g.cg, accounting) {
            (Some(cg), true) => {
                cg.reset_peak();
                cg.oom_kills()
            }
            _ => 0,
        };
        let sock = g.sock.as_mut().ok_or(Error::Closed)?;
        let mut cancelled = false;
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
                if !cancelled && interrupt() {
                    wire::write_frame(sock, &[wire::tag::CANCEL])?;
                    cancelled = true;
                }
            }
            wire::read_frame(sock)
        });
        match r {
            Ok(Some(_)) if cancelled => Err(Error::Interrupted),
            Ok(Some(b)) => {
                let (oom, peak) = match (&g.cg, accounting) {
                    (Some(cg), true) => (cg.oom_kills().saturating_sub(oom0), cg.peak()),
                    _ => (0, 0),
                };
                Ok((b, oom, peak))
            }
            other => {
                Self::teardown(&mut g);
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
        let timeout = self.timeout(req.timeout)?;
        check_payload("stdin", req.stdin.as_ref().map_or(0, Vec::len))?;
        let mut e = Enc::new(tag::EXEC);
        e.list(&req.argv)
            .list(&self.policy.environment(&req.env))
            .bytes(&cwd);
        e.opt_bytes(req.stdin.as_deref())
            .u64((timeout * 1e3).ceil() as u64);
        e.u64(self.policy.max_output_bytes)
            .u64(self.policy.cpu_seconds.unwrap_or(0));
        self.result(&e.0, timeout, interrupt)
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
        let (resp, oom, peak) = self.call(body, timeout, true, interrupt)?;
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
            oom_killed: oom > 0,
            peak_memory: peak,
            ..Default::default()
        };
        if !has {
            o.signal = Some(libc::SIGKILL);
        } else if libc::WIFEXITED(status) {
            o.exit_code = Some(libc::WEXITSTATUS(status));
        } else if libc::WIFSIGNALED(status) {
            o.signal = Some(libc::WTERMSIG(status));
        }
        Ok(o)
    }

    /// Reads a regular file beneath the sandbox root (relative paths: beneath /workspace).
    pub fn read_file(&self, path: &[u8]) -> Result<Vec<u8>> {
        check_path(path)?;
        let mut e = Enc::new(tag::READ);
        e.bytes(path);
        let (resp, _, _) = self.call(&e.0, 60.0, false, &|| false)?;
        let mut d = Dec::new(&resp);
        match d.u8() {
            Ok(tag::DATA) => d
                .bytes()
                .map_err(|e| Error::Sandbox(format!("bad data frame: {e}"))),
            Ok(tag::ERROR) => Err(wire::decode_error(&mut d)),
            _ => Err(Error::Sandbox("unexpected frame".into())),
        }
    }

    /// Creates or replaces a regular file beneath the sandbox root.
    pub fn write_file(&self, path: &[u8], data: &[u8]) -> Result<()> {
        check_path(path)?;
        check_payload("data", data.len())?;
        let mut e = Enc::new(tag::WRITE);
        e.bytes(path).bytes(data);
        let (resp, _, _) = self.call(&e.0, 60.0, false, &|| false)?;
        let mut d = Dec::new(&resp);
        match d.u8() {
            Ok(tag::OK) => Ok(()),
            Ok(tag::ERROR) => Err(wire::decode_error(&mut d)),
            _ => Err(Error::Sandbox("unexpected frame".into())),
        }
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

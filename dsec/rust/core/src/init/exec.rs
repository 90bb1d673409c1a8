//! One exec call: a reaper, pid 1 of a fresh pid namespace, forks the command, which confines
//! itself and execs. When the command exits, the reaper kills and reaps every process left in
//! that namespace (background jobs, setsid/double-fork daemons, nohup), reports, and exits. On
//! timeout or cancel the init SIGKILLs the reaper and the kernel kills the namespace. The
//! reaper is pid 1 of its namespace, so the command cannot signal it; the init lives in the
//! parent namespace, out of reach.
//!
//! Exec calls run on a reaper started ahead of them (`super::warm`); background processes
//! (`spawn`) on one started with the command ([`start_reaper`]).

use super::confine::{enter, Confinement};
use super::pump::Pumped;
use crate::sys::{clone_fork, close, pipe, write_all_fd};
use crate::wire::{self, Dec, Enc};
use std::cell::Cell;
use std::ffi::CString;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// A decoded exec request.
pub struct Job {
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: CString,
    pub stdin: Option<Vec<u8>>,
    pub timeout: f64,
    pub max_output: usize,
    pub cpu_seconds: Option<u64>,
}

/// The result of one call.
pub struct Outcome {
    /// Raw wait status of the command, `None` if it was killed before reporting (timeout).
    pub status: Option<i32>,
    pub pumped: Pumped,
    pub cpu: f64,
}

/// What the command's own process needs of a job: sent to a warm reaper's child.
pub(super) struct Command {
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    cpu_seconds: Option<u64>,
    stdin: bool,
}

impl Command {
    pub(super) fn of(job: &Job) -> Self {
        Command {
            argv: job.argv.clone(),
            envp: job.envp.clone(),
            cwd: job.cwd.clone(),
            cpu_seconds: job.cpu_seconds,
            stdin: job.stdin.is_some(),
        }
    }

    /// The job's command as a warm child reads it ([`Command::decode`]).
    pub(super) fn encode(job: &Job) -> Vec<u8> {
        let bytes = |v: &[CString]| v.iter().map(|c| c.as_bytes().to_vec()).collect::<Vec<_>>();
        let mut e = Enc::new(0);
        e.list(&bytes(&job.argv)).list(&bytes(&job.envp));
        e.bytes(job.cwd.as_bytes());
        e.u64(job.cpu_seconds.unwrap_or(0))
            .u8(job.stdin.is_some() as u8);
        e.0
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let mut d = Dec::new(b);
        d.u8().ok()?;
        let cs = |v: Vec<Vec<u8>>| {
            v.into_iter()
                .map(CString::new)
                .collect::<Result<Vec<_>, _>>()
        };
        let argv = cs(d.list().ok()?).ok()?;
        let envp = cs(d.list().ok()?).ok()?;
        let cwd = CString::new(d.bytes().ok()?).ok()?;
        let cpu = d.u64().ok()?;
        let stdin = d.u8().ok()? != 0;
        (!argv.is_empty()).then_some(Command {
            argv,
            envp,
            cwd,
            cpu_seconds: (cpu > 0).then_some(cpu),
            stdin,
        })
    }
}

fn ptrs(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Candidate paths for argv[0] (PATH search when it has no slash).
fn candidates(argv0: &[u8], envp: &[CString]) -> Vec<CString> {
    if argv0.contains(&b'/') {
        return CString::new(argv0).into_iter().collect();
    }
    let path = envp
        .iter()
        .find_map(|e| e.as_bytes().strip_prefix(b"PATH="))
        .unwrap_or(b"/usr/bin:/bin");
    path.split(|&b| b == b':')
        .filter(|d| !d.is_empty())
        .filter_map(|d| {
            let mut p = d.to_vec();
            p.push(b'/');
            p.extend_from_slice(argv0);
            CString::new(p).ok()
        })
        .collect()
}

/// What the status pipe carried: the reaper writes it once, in one `write` (at most
/// `PIPE_BUF` bytes, so it arrives whole), after the command and everything it left in the
/// call's namespace are gone. Nothing at all when the reaper was killed first.
#[derive(Debug, PartialEq)]
pub(super) struct Report {
    /// The child's setup error (confinement, CPU limit).
    pub error: Option<String>,
    /// The command's wait status.
    pub status: Option<i32>,
    /// CPU seconds of the command and of every process of the call's namespace.
    pub cpu: f64,
}

/// Longest setup error message sent (the report must fit in `PIPE_BUF`).
const MAX_ERROR: usize = 1024;

impl Report {
    /// b'E', u32 length, message (only with an error); b'S', i32 status, f64 CPU seconds.
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        if let Some(m) = &self.error {
            let mut end = m.len().min(MAX_ERROR);
            while !m.is_char_boundary(end) {
                end -= 1;
            }
            b.push(b'E');
            b.extend_from_slice(&(end as u32).to_le_bytes());
            b.extend_from_slice(&m.as_bytes()[..end]);
        }
        b.push(b'S');
        b.extend_from_slice(&self.status.unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&self.cpu.to_le_bytes());
        b
    }

    pub(super) fn parse(b: &[u8]) -> Report {
        let mut r = Report {
            error: None,
            status: None,
            cpu: 0.0,
        };
        let mut rest = b;
        if rest.first() == Some(&b'E') && rest.len() >= 5 {
            let n = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let end = (5 + n).min(rest.len());
            r.error = Some(String::from_utf8_lossy(&rest[5..end]).into_owned());
            rest = &rest[end..];
        }
        if let Some(&[b'S', s0, s1, s2, s3, ref cpu @ ..]) = rest.get(..13) {
            r.status = Some(i32::from_le_bytes([s0, s1, s2, s3]));
            let mut c = [0u8; 8];
            c.copy_from_slice(cpu);
            r.cpu = f64::from_le_bytes(c);
        }
        r
    }

    /// Reads the report once the pipe is readable (the report, or end of file once the reaper
    /// is gone), without waiting for the reaper to exit: one read, since it was written whole.
    /// Empty (no status) when the reaper died without writing it.
    pub(super) fn read(sr: RawFd) -> Report {
        let mut buf = [0u8; 2 * MAX_ERROR];
        loop {
            // SAFETY: buf is a valid buffer.
            let n = unsafe { libc::read(sr, buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Report::parse(&buf[..n as usize]);
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return Report::parse(&[]);
            }
        }
    }
}

/// Closes every descriptor above 2 except `keep` (in a freshly forked, single-threaded
/// process), so a reaper holds nothing of the init's: the control socket, the pipes of other
/// calls and of background processes.
pub(super) fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep.iter().filter(|&&f| f > 2).map(|&f| f as u32).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for fd in keep {
        if fd > from {
            // SAFETY: closing descriptors of this process.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        from = fd + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

/// In the confined child: wire stdio, set the CPU limit, enter `cwd`, exec. Never returns.
fn exec_command(cmd: &Command, fds: [RawFd; 3], failed: &Cell<Option<String>>) -> ! {
    // SAFETY: dup2 / close_range in a single-threaded child.
    unsafe {
        libc::dup2(fds[0], 0);
        libc::dup2(fds[1], 1);
        libc::dup2(fds[2], 2);
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32); // CLOSE_RANGE_CLOEXEC
    }
    if let Some(s) = cmd.cpu_seconds {
        let r = libc::rlimit {
            rlim_cur: s,
            rlim_max: s + 1,
        };
        // SAFETY: r is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_CPU, &r) } != 0 {
            let e = std::io::Error::last_os_error();
            failed.set(Some(format!("setrlimit CPU: {e}")));
            // SAFETY: terminating the child.
            unsafe { libc::_exit(126) };
        }
    }
    // SAFETY: cwd is a valid C string.
    if unsafe { libc::chdir(cmd.cwd.as_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        let msg = format!("dsec: cannot enter {}: {e}\n", cmd.cwd.to_string_lossy());
        let _ = write_all_fd(2, msg.as_bytes());
        // SAFETY: terminating the child.
        unsafe { libc::_exit(126) };
    }
    let argv = ptrs(&cmd.argv);
    let envp = ptrs(&cmd.envp);
    let mut last = libc::ENOENT;
    for c in candidates(cmd.argv[0].as_bytes(), &cmd.envp) {
        // SAFETY: valid null-terminated arrays of C strings.
        unsafe { libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::ENOENT);
        if e != libc::ENOENT && e != libc::ENOTDIR {
            last = e;
        }
    }
    let msg = format!(
        "dsec: {}: {}\n",
        cmd.argv[0].to_string_lossy(),
        std::io::Error::from_raw_os_error(last)
    );
    let _ = write_all_fd(2, msg.as_bytes());
    // SAFETY: terminating the child.
    unsafe { libc::_exit(if last == libc::ENOENT { 127 } else { 126 }) }
}

/// What the command's child needs, passed through `clone`'s argument pointer. The child
/// shares the reaper's memory until it execs (`CLONE_VM`), so it reports through the cells,
/// which the reaper reads once `clone` returns.
pub(super) struct ChildArgs<'a> {
    pub conf: &'a Confinement,
    /// The command, or `None` for a warm child, which reads it from `job_r`.
    pub cmd: Option<&'a Command>,
    /// stdin (a pipe, or devnull when the command gets none), stdout, stderr.
    pub fds: [RawFd; 3],
    pub devnull: RawFd,
    pub job_r: RawFd,
    /// Set by a warm child when it has its command (a page shared with the init).
    pub took: Option<&'a AtomicBool>,
    /// Set by the child when it could not be confined or limited.
    pub failed: Cell<Option<String>>,
}

impl<'a> ChildArgs<'a> {
    pub fn new(conf: &'a Confinement, cmd: Option<&'a Command>, fds: [RawFd; 3]) -> Self {
        ChildArgs {
            conf,
            cmd,
            fds,
            devnull: -1,
            job_r: -1,
            took: None,
            failed: Cell::new(None),
        }
    }
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the ChildArgs of the suspended parent (CLONE_VFORK).
    let a = unsafe { &*(arg as *const ChildArgs) };
    if let Err(m) = enter(a.conf) {
        a.failed.set(Some(m));
        // SAFETY: terminating the child.
        unsafe { libc::_exit(126) };
    }
    if let Some(cmd) = a.cmd {
        exec_command(cmd, a.fds, &a.failed);
    }
    let mut pipe = ManuallyDrop::new(unsafe { File::from_raw_fd(a.job_r) });
    let Some(cmd) = wire::read_frame(&mut *pipe)
        .ok()
        .flatten()
        .and_then(|b| Command::decode(&b))
    else {
        // SAFETY: the reaper was discarded before its call (or sent garbage): nothing ran.
        unsafe { libc::_exit(0) }
    };
    if let Some(t) = a.took {
        t.store(true, Ordering::SeqCst);
    }
    let stdin = if cmd.stdin { a.fds[0] } else { a.devnull };
    exec_command(&cmd, [stdin, a.fds[1], a.fds[2]], &a.failed)
}

/// Stack of the command's child until its execve: confinement and path search need little.
const CHILD_STACK: usize = 256 << 10;

/// Starts the command the way posix_spawn does: `clone(CLONE_VM | CLONE_VFORK)` on a stack of
/// its own. The child shares the reaper's memory (no page-table copy, no copy-on-write faults)
/// but not its file table, signal handlers, credentials, limits or cwd, so the confinement
/// applies to the child alone; the reaper stays suspended until the child execs or exits.
/// Returns the child's pid, or -1.
fn spawn_command(args: &ChildArgs<'_>) -> libc::pid_t {
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    // SAFETY: the top of an allocation of CHILD_STACK bytes, aligned down to 16 bytes.
    let top = unsafe { stack.as_mut_ptr().add(CHILD_STACK) } as usize & !15;
    // SAFETY: child_main runs on its own stack and never returns into our frames; with
    // CLONE_VFORK this thread is suspended while the child uses `args` and the stack.
    unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            args as *const ChildArgs as *mut libc::c_void,
        )
    }
}

/// Kills every other process of the reaper's namespace (what the command left running) and
/// reaps them all, orphans included; returns the CPU seconds of everything reaped.
fn clear_namespace() -> f64 {
    // SAFETY: as pid 1 of the call's namespace, -1 reaches every process in it but ourselves.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    loop {
        // SAFETY: reaping any child; no status wanted.
        let p = unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
        if p < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break; // ECHILD: no process is left in the namespace
        }
    }
    // SAFETY: ru is plain data.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    cpu_seconds(&ru)
}

/// The reaper: starts the command's child and closes its copies of the child's descriptors.
/// When the child exits, it clears the namespace, writes the report on `sw` and exits, so the
/// init can answer on the report while the reaper's exit finishes. Never returns.
pub(super) fn reaper_main(args: &ChildArgs<'_>, sw: RawFd, own: &[RawFd]) -> ! {
    let cmd = spawn_command(args);
    for &fd in own {
        close(fd);
    }
    let mut report = Report {
        error: args.failed.take(),
        status: None,
        cpu: 0.0,
    };
    if cmd < 0 {
        report.error = Some(format!("fork: {}", std::io::Error::last_os_error()));
        let _ = write_all_fd(sw, &report.encode());
        // SAFETY: terminating the reaper.
        unsafe { libc::_exit(1) };
    }
    loop {
        let mut st = 0;
        // SAFETY: st is a valid int.
        let p = unsafe { libc::waitpid(-1, &mut st, 0) };
        if p == cmd {
            report.status = Some(st);
            report.cpu = clear_namespace();
            let _ = write_all_fd(sw, &report.encode());
            // The init, just woken, answers first: a wakee does not preempt its waker, and
            // this exit (address space, namespace) takes longer than the answer.
            // SAFETY: plain syscall.
            unsafe { libc::sched_yield() };
            // SAFETY: nothing is left in the namespace; exiting pid 1 ends it.
            unsafe { libc::_exit(0) };
        }
        if p < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: terminating the reaper.
            unsafe { libc::_exit(1) };
        }
    }
}

/// `clone(CLONE_NEWPID)`. A finished call's pid namespace leaves the sandbox's budget
/// (`inner::USERNS_MAX`) only once RCU frees its last pid: tens of ms here, more under load, so a
/// burst of calls can find the budget full for a moment (ENOSPC). `patient`: wait for it, up to
/// 5 s; otherwise fail at once (for a reaper started ahead, which is best effort).
pub(super) fn clone_new_pid(patient: bool) -> std::io::Result<libc::pid_t> {
    let deadline = crate::sys::now() + 5.0;
    let mut pause = 1;
    loop {
        match clone_fork(libc::CLONE_NEWPID) {
            Err(e)
                if patient
                    && e.raw_os_error() == Some(libc::ENOSPC)
                    && crate::sys::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(pause));
                pause = (pause * 2).min(50);
            }
            r => return r,
        }
    }
}

/// Clones the reaper of a background process into a fresh pid namespace (pid 1 there); it
/// starts the command with `fds` as its stdin, stdout and stderr and reports the command's
/// wait status on the returned pipe, then exits. Returns the reaper's pid and the read end of
/// the status pipe; the init keeps its own `fds`.
pub fn start_reaper(
    job: &Job,
    conf: &Confinement,
    fds: [RawFd; 3],
    devnull: RawFd,
) -> Result<(libc::pid_t, RawFd), String> {
    let io = |e: std::io::Error| format!("exec setup: {e}");
    let (sr, sw) = pipe().map_err(io)?;
    let reaper = match clone_new_pid(true) {
        Ok(p) => p,
        Err(e) => {
            close(sr);
            close(sw);
            return Err(io(e));
        }
    };
    if reaper == 0 {
        close_all_but(&[fds[0], fds[1], fds[2], sw, devnull, conf.landlock_fd]);
        let cmd = Command::of(job);
        let args = ChildArgs::new(conf, Some(&cmd), fds);
        let own: Vec<RawFd> = fds.into_iter().filter(|&f| f != devnull).collect();
        reaper_main(&args, sw, &own);
    }
    close(sw);
    Ok((reaper, sr))
}

/// Reads what a background process's reaper reported once it exited: `Err` if the command
/// could not be confined, else its wait status and the CPU seconds of its namespace (`None`:
/// killed before it reported).
pub fn reaper_report(sr: RawFd) -> Result<Option<(i32, f64)>, String> {
    let r = Report::read(sr);
    match r.error {
        Some(m) => Err(format!("cannot confine the command: {m}")),
        None => Ok(r.status.map(|s| (s, r.cpu))),
    }
}

/// User + system CPU seconds of a rusage.
pub fn cpu_seconds(ru: &libc::rusage) -> f64 {
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_report_round_trip() {
        let r = |error: Option<&str>, status: Option<i32>, cpu| Report {
            error: error.map(String::from),
            status,
            cpu,
        };
        for rep in [
            r(None, Some(3 << 8), 0.25),
            r(Some("no"), Some(126 << 8), 0.0),
            r(Some("é".repeat(MAX_ERROR).as_str()), Some(0), 1.5),
        ] {
            let b = rep.encode();
            assert!(b.len() <= libc::PIPE_BUF);
            let back = Report::parse(&b);
            assert_eq!(back.status, rep.status);
            assert_eq!(back.cpu, rep.cpu);
            let (e, be) = (
                rep.error.unwrap_or_default(),
                back.error.unwrap_or_default(),
            );
            assert!(e.starts_with(&be) && be.len() + 1 >= e.len().min(MAX_ERROR));
        }
        assert_eq!(Report::parse(&[]), r(None, None, 0.0));
        assert_eq!(Report::parse(b"S\x01"), r(None, None, 0.0));
    }

    #[test]
    fn path_search_candidates() {
        let env = vec![CString::new("PATH=/a:/b").unwrap()];
        let c: Vec<_> = candidates(b"ls", &env)
            .into_iter()
            .map(|c| c.into_bytes())
            .collect();
        assert_eq!(c, vec![b"/a/ls".to_vec(), b"/b/ls".to_vec()]);
        assert_eq!(candidates(b"./x", &env).len(), 1);
    }
}

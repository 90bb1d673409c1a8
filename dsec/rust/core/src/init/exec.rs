//! One exec call: the init clones a reaper into a fresh pid namespace (pid 1 there); the reaper
//! forks the command, which confines itself and execs. When the command exits, the reaper
//! reports its status and exits, and the kernel kills every process left in that namespace
//! (background jobs, setsid/double-fork daemons, nohup). On timeout the init SIGKILLs the
//! reaper with the same effect. The reaper is pid 1 of its namespace, so the command cannot
//! signal it; the init lives in the parent namespace, out of reach.

use super::confine::{enter, Confinement};
use super::pump::{pump, HostGone, Pumped};
use crate::sys::{clone_fork, close, cvt, pidfd_open, pipe, write_all_fd};
use std::ffi::CString;
use std::os::fd::RawFd;

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

/// Setup failure report of the child on the status pipe: b'E', u32 length, message.
fn report_setup_error(sw: RawFd, msg: &str) {
    let mut b = vec![b'E'];
    b.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    b.extend_from_slice(msg.as_bytes());
    let _ = write_all_fd(sw, &b);
}

/// Parses the status pipe contents: an optional setup error, then b'S' + i32 status.
fn parse_status(b: &[u8]) -> (Option<String>, Option<i32>) {
    let mut err = None;
    let mut rest = b;
    if rest.first() == Some(&b'E') && rest.len() >= 5 {
        let n = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let end = (5 + n).min(rest.len());
        err = Some(String::from_utf8_lossy(&rest[5..end]).into_owned());
        rest = &rest[end..];
    }
    let st = (rest.first() == Some(&b'S') && rest.len() >= 5)
        .then(|| i32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]));
    (err, st)
}

fn read_all(fd: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: buf is valid.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    out
}

/// In the confined child: wire stdio, confine, exec. Never returns.
fn child_exec(job: &Job, conf: &Confinement, fds: [RawFd; 3], sw: RawFd) -> ! {
    // SAFETY: dup2 / close_range in a single-threaded child.
    unsafe {
        libc::dup2(fds[0], 0);
        libc::dup2(fds[1], 1);
        libc::dup2(fds[2], 2);
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32); // CLOSE_RANGE_CLOEXEC
        let _ = libc::fcntl(sw, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    if let Err(m) = enter(conf, job.cpu_seconds) {
        report_setup_error(sw, &m);
        // SAFETY: terminating the child.
        unsafe { libc::_exit(126) };
    }
    // SAFETY: cwd is a valid C string.
    if unsafe { libc::chdir(job.cwd.as_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        let msg = format!("dsec: cannot enter {}: {e}\n", job.cwd.to_string_lossy());
        let _ = write_all_fd(2, msg.as_bytes());
        // SAFETY: terminating the child.
        unsafe { libc::_exit(126) };
    }
    let argv = ptrs(&job.argv);
    let envp = ptrs(&job.envp);
    let mut last = libc::ENOENT;
    for c in candidates(job.argv[0].as_bytes(), &job.envp) {
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
        job.argv[0].to_string_lossy(),
        std::io::Error::from_raw_os_error(last)
    );
    let _ = write_all_fd(2, msg.as_bytes());
    // SAFETY: terminating the child.
    unsafe { libc::_exit(if last == libc::ENOENT { 127 } else { 126 }) }
}

/// What the command's child needs, passed through `clone`'s argument pointer.
struct ChildArgs<'a> {
    job: &'a Job,
    conf: &'a Confinement,
    fds: [RawFd; 3],
    sw: RawFd,
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the ChildArgs of the suspended parent (CLONE_VFORK).
    let a = unsafe { &*(arg as *const ChildArgs) };
    child_exec(a.job, a.conf, a.fds, a.sw)
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

/// Clones the reaper of a call into a fresh pid namespace (pid 1 there); it starts the
/// command with `fds` as its stdin, stdout and stderr and reports the command's wait status
/// on the returned pipe, then exits. In the reaper, `drop` are closed first and its copies of
/// `fds` once the command started (stdin only when it is not `devnull`). Returns the
/// reaper's pid and the read end of the status pipe; the init keeps its own `fds`.
pub fn start_reaper(
    job: &Job,
    conf: &Confinement,
    fds: [RawFd; 3],
    devnull: RawFd,
    drop: &[RawFd],
) -> Result<(libc::pid_t, RawFd), String> {
    let io = |e: std::io::Error| format!("exec setup: {e}");
    let (sr, sw) = pipe().map_err(io)?;
    let reaper = match clone_fork(libc::CLONE_NEWPID) {
        Ok(p) => p,
        Err(e) => {
            close(sr);
            close(sw);
            return Err(io(e));
        }
    };
    if reaper == 0 {
        // Reaper: pid 1 of the call's pid namespace.
        for &fd in drop.iter().chain([&sr]) {
            close(fd);
        }
        let args = ChildArgs { job, conf, fds, sw };
        let cmd = spawn_command(&args);
        close(fds[1]);
        close(fds[2]);
        if fds[0] != devnull {
            close(fds[0]);
        }
        if cmd < 0 {
            report_setup_error(sw, &format!("fork: {}", std::io::Error::last_os_error()));
            // SAFETY: terminating the reaper.
            unsafe { libc::_exit(1) };
        }
        loop {
            let mut st = 0;
            // SAFETY: st is a valid int.
            let p = unsafe { libc::waitpid(-1, &mut st, 0) };
            if p == cmd {
                let mut b = vec![b'S'];
                b.extend_from_slice(&st.to_le_bytes());
                let _ = write_all_fd(sw, &b);
                // SAFETY: exiting pid 1 tears the namespace down.
                unsafe { libc::_exit(0) };
            }
            if p < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // SAFETY: terminating the reaper.
                unsafe { libc::_exit(1) };
            }
        }
    }
    close(sw);
    Ok((reaper, sr))
}

/// Reads what the reaper reported once it exited: `Err` if the command could not be
/// confined, else its wait status (`None`: killed before it reported).
pub fn reaper_report(sr: RawFd) -> Result<Option<i32>, String> {
    let report = read_all(sr);
    let (err, status) = parse_status(&report);
    match err {
        Some(m) => Err(format!("cannot confine the command: {m}")),
        None => Ok(status),
    }
}

/// User + system CPU seconds of a rusage.
pub fn cpu_seconds(ru: &libc::rusage) -> f64 {
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs one exec call.
pub fn run(job: &Job, conf: &Confinement, ctrl: RawFd, devnull: RawFd) -> Result<Outcome, String> {
    let io = |e: std::io::Error| format!("exec setup: {e}");
    let (out_r, out_w) = pipe().map_err(io)?;
    let (err_r, err_w) = pipe().map_err(io)?;
    let (in_r, in_w) = match job.stdin {
        Some(_) => {
            let (r, w) = pipe().map_err(io)?;
            (r, w)
        }
        None => (devnull, -1),
    };
    let started = start_reaper(
        job,
        conf,
        [in_r, out_w, err_w],
        devnull,
        &[out_r, err_r, in_w, ctrl],
    );
    for fd in [out_w, err_w] {
        close(fd);
    }
    if in_r != devnull {
        close(in_r);
    }
    let (reaper, sr) = match started {
        Ok(r) => r,
        Err(m) => {
            for fd in [out_r, err_r, in_w] {
                close(fd);
            }
            return Err(m);
        }
    };
    let pidfd = pidfd_open(reaper).map_err(io)?;
    let mut kill = || {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(reaper, libc::SIGKILL) };
    };
    let stdin = job.stdin.as_deref().map(|d| (in_w, d));
    let pumped = pump(
        ctrl,
        out_r,
        err_r,
        stdin,
        &[pidfd],
        job.timeout,
        job.max_output,
        &mut kill,
    );
    if pumped.is_err() {
        kill();
    }
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut st = 0;
    // SAFETY: waiting for our own child with valid out-pointers.
    let _ = cvt(unsafe { libc::wait4(reaper, &mut st, 0, &mut ru) });
    close(pidfd);
    let report = reaper_report(sr);
    close(sr);
    let pumped = pumped.map_err(|HostGone| "host closed the control socket".to_string())?;
    Ok(Outcome {
        status: report?,
        pumped,
        cpu: cpu_seconds(&ru),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_report_parsing() {
        let mut b = vec![b'S'];
        b.extend_from_slice(&(3i32 << 8).to_le_bytes());
        assert_eq!(parse_status(&b), (None, Some(3 << 8)));
        let mut e = vec![b'E', 2, 0, 0, 0, b'n', b'o'];
        e.extend_from_slice(&b);
        assert_eq!(parse_status(&e), (Some("no".into()), Some(3 << 8)));
        assert_eq!(parse_status(&[]), (None, None));
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

//! Confinement of a sandboxed process, applied in the forked child right before `execve`, in
//! this order: signals reset, new session, rlimits, securebits, capability bounding set and
//! ambient set cleared, no_new_privs, landlock, all capabilities dropped, seccomp.

use crate::sys::{cvt, write_path};
use seccompiler::BpfProgram;
use std::os::fd::RawFd;

/// Everything the init prepares once and every sandboxed process applies.
pub struct Confinement {
    pub filters: Vec<BpfProgram>,
    /// Landlock ruleset fd, or -1 when landlock is not available (and not required).
    pub landlock_fd: RawFd,
    /// Capabilities still in the init's bounding set (see [`Confinement::probe`]); the child
    /// drops each of them, which empties its bounding set.
    pub bound_caps: Vec<u32>,
    /// Signals whose disposition in the init is not SIG_DFL; only these need a reset (an
    /// ignored disposition would survive execve).
    pub reset_signals: Vec<libc::c_int>,
    pub nofile: u64,
    pub fsize: u64,
    pub nproc: u64,
}

/// RLIMIT_SIGPENDING and RLIMIT_MSGQUEUE of every sandboxed process.
pub const SIGPENDING: u64 = 1024;
pub const MSGQUEUE: u64 = 512 << 10;

const SECBITS: libc::c_ulong = 0xEF; // NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED, NO_CAP_AMBIENT_RAISE (+locks)

fn rlimit(res: libc::__rlimit_resource_t, soft: u64, hard: u64, name: &str) -> Result<(), String> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: r is a valid rlimit.
    cvt(unsafe { libc::setrlimit(res, &r) })
        .map(|_| ())
        .map_err(|e| format!("setrlimit {name}: {e}"))
}

/// Sets soft and hard limit to `v`, or to the current hard limit where that is lower (raising
/// it needs CAP_SYS_RESOURCE).
fn lower_rlimit(res: libc::__rlimit_resource_t, v: u64, name: &str) -> Result<(), String> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: cur is a valid rlimit.
    unsafe { libc::getrlimit(res, &mut cur) };
    let v = v.min(cur.rlim_max);
    rlimit(res, v, v, name)
}

fn prctl(op: libc::c_int, a: libc::c_ulong, what: &str) -> Result<(), String> {
    // SAFETY: prctl with integer arguments.
    cvt(unsafe {
        libc::prctl(
            op,
            a,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
    .map(|_| ())
    .map_err(|e| format!("prctl {what}: {e}"))
}

impl Confinement {
    /// Reads, once in the init after its own setup, what every child has to undo: the signals
    /// not at their default disposition and the capabilities left in the bounding set (up to
    /// `cap_last`). The init changes none of them later, so a forked child starts from
    /// exactly this state and [`enter`] stays complete.
    pub fn probe(cap_last: u32) -> (Vec<u32>, Vec<libc::c_int>) {
        let caps = (0..=cap_last)
            .filter(|&c| {
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(libc::PR_CAPBSET_READ, c as libc::c_ulong, 0, 0, 0) != 0 }
            })
            .collect();
        let sigs = (1..libc::SIGRTMAX())
            .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
            .filter(|&sig| {
                // SAFETY: querying a disposition into a zeroed sigaction.
                unsafe {
                    let mut old: libc::sigaction = std::mem::zeroed();
                    libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                        || old.sa_sigaction != libc::SIG_DFL
                }
            })
            .collect();
        (caps, sigs)
    }
}

/// Applies the confinement to the calling (single-threaded, freshly forked) process.
pub fn enter(c: &Confinement) -> Result<(), String> {
    // SAFETY: resetting signal dispositions and the mask in a single-threaded child.
    unsafe {
        for &sig in &c.reset_signals {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::setsid();
        libc::umask(0o022);
    }
    // Workload processes are the OOM killer's first choice within the sandbox's cgroup, so
    // memory pressure they create kills them, never the init (raising needs no privilege).
    // The file belongs to host root while the process is not dumpable (inherited from the
    // init): dumpable for the write only, before any sandboxed code runs.
    prctl(libc::PR_SET_DUMPABLE, 1, "SET_DUMPABLE")?;
    let oom = write_path("/proc/self/oom_score_adj", b"1000");
    prctl(libc::PR_SET_DUMPABLE, 0, "SET_DUMPABLE")?;
    oom.map_err(|e| format!("oom_score_adj: {e}"))?;
    rlimit(libc::RLIMIT_NOFILE, c.nofile, c.nofile, "NOFILE")?;
    rlimit(libc::RLIMIT_FSIZE, c.fsize, c.fsize, "FSIZE")?;
    rlimit(libc::RLIMIT_CORE, 0, 0, "CORE")?;
    rlimit(libc::RLIMIT_NPROC, c.nproc, c.nproc, "NPROC")?;
    // Queued signals and POSIX message queue bytes are per-user kernel budgets shared along
    // the user-namespace chain: bound what one sandbox may hold.
    lower_rlimit(libc::RLIMIT_SIGPENDING, SIGPENDING, "SIGPENDING")?;
    lower_rlimit(libc::RLIMIT_MSGQUEUE, MSGQUEUE, "MSGQUEUE")?;
    prctl(libc::PR_SET_SECUREBITS, SECBITS, "SET_SECUREBITS")?;
    for &cap in &c.bound_caps {
        prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, "CAPBSET_DROP")?;
    }
    // SAFETY: prctl with integer arguments.
    cvt(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })
    .map_err(|e| format!("clear ambient caps: {e}"))?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "SET_NO_NEW_PRIVS")?;
    if c.landlock_fd >= 0 {
        crate::landlock::restrict_self(c.landlock_fd).map_err(|e| format!("landlock: {e}"))?;
    }
    drop_caps()?;
    crate::seccomp::apply(&c.filters).map_err(|e| format!("seccomp: {e}"))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn drop_caps() -> Result<(), String> {
    let hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: valid header and two data entries (capability version 3).
    let r = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) };
    cvt(r).map(|_| ()).map_err(|e| format!("capset: {e}"))
}

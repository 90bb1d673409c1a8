//! The inner part of the init: pid 1 of the sandbox. Builds the root (mount plan, pivot_root),
//! brings loopback up, prepares the confinement (seccomp BPF, landlock ruleset) once, and
//! serves the host's requests one at a time until the control socket closes.

use super::confine::Confinement;
use super::exec::{Job, Outcome};
use super::files;
use super::procs::Procs;
use super::pyserver::PyServer;
use super::warm::Reapers;
use crate::mounts::{self, PlanInput, ETC_BINDS, IMAGE_DIRS};
use crate::policy::Policy;
use crate::sys::{close, cstr, cvt};
use crate::wire::{self, errkind, tag, Dec, Enc};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};

struct State {
    conf: Confinement,
    root_fd: RawFd,
    ws_fd: RawFd,
    devnull: RawFd,
    envp: Vec<CString>,
    py: Option<PyServer>,
    procs: Procs,
    /// The exec calls' reapers (see `super::warm`).
    reapers: Reapers,
    /// The ipc namespace's mqueue filesystem (see `reset::mqueue_fd`), or -1.
    mq_fd: RawFd,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    pad: [u8; 22],
}

fn loopback_up() -> Result<(), String> {
    // SAFETY: plain socket/ioctl calls with a valid ifreq.
    unsafe {
        let s = cvt(libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        ))
        .map_err(|e| format!("socket: {e}"))?;
        let mut ifr = IfReq {
            name: [0; 16],
            flags: 0,
            pad: [0; 22],
        };
        ifr.name[..2].copy_from_slice(b"lo");
        let r = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr);
        ifr.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let r2 = if r == 0 {
            libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr)
        } else {
            r
        };
        let e = std::io::Error::last_os_error();
        close(s);
        if r2 != 0 {
            return Err(format!("loopback up: {e}"));
        }
    }
    Ok(())
}

/// Capabilities the init keeps (inside its own user namespace) after setup: SYS_ADMIN (21) to
/// create the per-call pid namespaces, SETPCAP (8) so children can drop their bounding set
/// and lock securebits, DAC_OVERRIDE (1), DAC_READ_SEARCH (2) and FOWNER (3) so the file API
/// reaches files the sandbox chmod-ed. Everything else leaves the bounding, permitted and
/// effective sets.
pub const INIT_CAPS: [u32; 5] = [21, 8, 1, 2, 3];

fn keep_only_needed_caps(cap_last: u32) -> Result<(), String> {
    let mut mask = [0u32; 2];
    for c in INIT_CAPS {
        mask[(c / 32) as usize] |= 1 << (c % 32);
    }
    for cap in 0..=cap_last {
        if !INIT_CAPS.contains(&cap) {
            // SAFETY: prctl with integer arguments.
            cvt(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })
                .map_err(|e| format!("drop capability {cap} from the bounding set: {e}"))?;
        }
    }
    #[repr(C)]
    struct Hdr(u32, i32);
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data(u32, u32, u32);
    let hdr = Hdr(0x2008_0522, 0);
    let data = [Data(mask[0], mask[0], 0), Data(mask[1], mask[1], 0)];
    // SAFETY: valid capability header and two data entries (version 3).
    let r = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const Hdr, data.as_ptr()) };
    cvt(r).map(|_| ()).map_err(|e| format!("capset: {e}"))
}

/// Kernel budgets of the sandbox's own namespaces, set while the init still holds its
/// capabilities there: SysV shared memory of its ipc namespace within the memory budget, and
/// the per-namespace counts of its user namespace (inotify, fanotify, namespaces), which the
/// kernel also charges to the user that created the namespace on the host; without them one
/// sandbox could take every inotify instance or watch of that host user.
fn limit_namespaces(p: &Policy) -> Result<(), String> {
    let shm = p.memory_budget().shm_bytes;
    let sets = [
        ("kernel/shmmax", shm),
        ("kernel/shmall", shm / 4096),
        ("kernel/shmmni", 64),
        ("user/max_inotify_instances", USERNS_MAX.inotify_instances),
        ("user/max_inotify_watches", USERNS_MAX.inotify_watches),
        ("user/max_fanotify_groups", 0),
        ("user/max_fanotify_marks", 0),
        ("user/max_user_namespaces", 0),
        ("user/max_net_namespaces", 0),
        ("user/max_mnt_namespaces", 0),
        ("user/max_ipc_namespaces", 0),
        ("user/max_uts_namespaces", 0),
        ("user/max_cgroup_namespaces", 0),
        ("user/max_time_namespaces", 0),
        ("user/max_pid_namespaces", USERNS_MAX.pid_namespaces),
    ];
    for (name, v) in sets {
        let path = format!("/proc/sys/{name}");
        if !std::path::Path::new(&path).exists() {
            continue;
        }
        crate::sys::write_path(&path, v.to_string().as_bytes())
            .map_err(|e| format!("set {path} to {v}: {e}"))?;
    }
    Ok(())
}

/// Per-sandbox limits of what its user namespace may hold at once.
pub struct UsernsMax {
    pub inotify_instances: u64,
    pub inotify_watches: u64,
    pub pid_namespaces: u64,
}

/// The values every sandbox gets: a few inotify instances and watches for tools that want
/// them; pid namespaces for the calls (one each, plus the reaper started ahead and the python
/// server; a finished call's namespace is uncounted only once RCU frees its last pid, tens of ms
/// later, so a burst of fast calls holds many at once: hence the slack, and a call that still
/// finds the budget full waits for it, see `exec::clone_new_pid`). Sandboxed code itself cannot
/// create namespaces (seccomp).
pub const USERNS_MAX: UsernsMax = UsernsMax {
    inotify_instances: 16,
    inotify_watches: 1024,
    pid_namespaces: 1024,
};

fn setup(p: &Policy, lower: RawFd) -> Result<State, String> {
    let m = |e: std::io::Error| e.to_string();
    // SAFETY: mount propagation change in our private mount namespace.
    cvt(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
    .map_err(|e| format!("make / private: {e}"))?;
    // Through the host's /proc, before the sandbox's read-only /proc/sys replaces it.
    limit_namespaces(p)?;
    let image = p
        .image
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).trim_end_matches('/').to_string())
        .unwrap_or_default();
    if !image.is_empty() && !std::path::Path::new(&format!("{image}/usr")).is_dir() {
        return Err(format!("image {image:?} has no usr directory"));
    }
    let root = if image.starts_with("/tmp") {
        "/mnt"
    } else {
        "/tmp"
    };
    let rc = cstr(root.as_bytes()).map_err(m)?;
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            rc.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"size=1m,mode=755".as_ptr().cast(),
        )
    })
    .map_err(|e| format!("mount root tmpfs: {e}"))?;
    let input = PlanInput {
        image: &image,
        image_entries: IMAGE_DIRS
            .iter()
            .map(|n| (*n, mounts::probe(&format!("{image}/{n}"))))
            .collect(),
        etc_entries: ETC_BINDS
            .iter()
            .chain(p.network.then_some(&"resolv.conf"))
            .map(|n| (*n, mounts::probe(&format!("{image}/etc/{n}"))))
            .collect(),
        disk_bytes: p.memory_budget().tmpfs_bytes,
        shm_bytes: p.memory_budget().shm_bytes,
    };
    mounts::apply(root, &mounts::plan(&input)).map_err(m)?;
    if lower >= 0 {
        crate::snapshot::mount_overlay(lower, &format!("{root}/workspace"))?;
    }
    mounts::pivot(root).map_err(|e| format!("pivot_root: {e}"))?;
    let mq_fd = super::reset::mqueue_fd();
    if !p.network {
        loopback_up()?;
    }
    // SAFETY: valid buffer and length.
    unsafe { libc::sethostname(c"sandbox".as_ptr(), 7) };
    let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let filters = crate::seccomp::build_split()?;
    let abi = crate::landlock::abi_version();
    let landlock_fd = if abi == 0 {
        if p.require_landlock {
            return Err("landlock is not enabled in this kernel (boot with lsm=...,landlock) and the policy requires it".into());
        }
        -1
    } else {
        let fd =
            crate::landlock::create_ruleset(abi).map_err(|e| format!("landlock ruleset: {e}"))?;
        // Keep it clear of the low fds children rewire (the python worker's fd 3).
        // SAFETY: duplicating an fd we own.
        let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 20) };
        close(fd);
        cvt(high).map_err(|e| format!("landlock fd: {e}"))?
    };
    let open = |path: &std::ffi::CStr, fl| {
        // SAFETY: valid C string.
        cvt(unsafe { libc::open(path.as_ptr(), fl | libc::O_CLOEXEC) })
            .map_err(|e| format!("open {path:?}: {e}"))
    };
    let root_fd = open(c"/", libc::O_PATH | libc::O_DIRECTORY)?;
    let ws_fd = open(c"/workspace", libc::O_PATH | libc::O_DIRECTORY)?;
    let devnull = open(c"/dev/null", libc::O_RDWR)?;
    let envp = p
        .environment(&[])
        .into_iter()
        .filter_map(|e| CString::new(e).ok())
        .collect();
    keep_only_needed_caps(cap_last)?;
    let (bound_caps, reset_signals) = Confinement::probe(cap_last);
    // Last step: the init confines itself with everything but the clone rule; children inherit
    // it and add the clone rule alone (see seccomp::SplitFilters).
    crate::seccomp::apply(&filters.init).map_err(|e| format!("seccomp on the init: {e}"))?;
    Ok(State {
        conf: Confinement {
            filters: filters.child,
            landlock_fd,
            bound_caps,
            reset_signals,
            nofile: p.max_open_files,
            fsize: p.disk_bytes,
            nproc: p.max_pids,
        },
        root_fd,
        ws_fd,
        devnull,
        envp,
        py: None,
        procs: Procs::default(),
        reapers: Reapers::new()?,
        mq_fd,
    })
}

fn cstrings(v: Vec<Vec<u8>>) -> Result<Vec<CString>, String> {
    v.into_iter()
        .map(|b| CString::new(b).map_err(|_| "argument contains a NUL byte".to_string()))
        .collect()
}

fn encode_outcome(o: Outcome) -> Vec<u8> {
    let mut e = Enc::new(tag::RESULT);
    match o.status {
        Some(s) => e.u8(1).i64(s as i64),
        None => e.u8(0).i64(0),
    };
    let p = o.pumped;
    e.u8(p.timed_out as u8);
    let (ot, et) = (p.out.truncated(), p.err.truncated());
    let (on, en) = (p.out.total(), p.err.total());
    e.bytes(&p.out.into_bytes()).bytes(&p.err.into_bytes());
    e.u8(ot as u8).u8(et as u8).u64(on).u64(en);
    e.u64(p.wall.to_bits()).u64(o.cpu.to_bits());
    e.0
}

fn handle(st: &mut State, ctrl: RawFd, body: &[u8]) -> Result<Vec<u8>, (u8, String)> {
    let bad = |e: std::io::Error| (errkind::SANDBOX, format!("bad request: {e}"));
    let mut d = Dec::new(body);
    match d.u8().map_err(bad)? {
        tag::EXEC | tag::SPAWN => {
            let background = body[0] == tag::SPAWN;
            let argv = cstrings(d.list().map_err(bad)?).map_err(|m| (errkind::POLICY, m))?;
            let envp = cstrings(d.list().map_err(bad)?).map_err(|m| (errkind::POLICY, m))?;
            let cwd = CString::new(d.bytes().map_err(bad)?)
                .map_err(|_| (errkind::POLICY, "cwd contains a NUL byte".into()))?;
            let stdin = d.opt_bytes().map_err(bad)?;
            let timeout = d.u64().map_err(bad)? as f64 / 1e3;
            let max_output = d.u64().map_err(bad)? as usize;
            let cpu = d.u64().map_err(bad)?;
            if argv.is_empty() {
                return Err((errkind::POLICY, "cmd must not be empty".into()));
            }
            let job = Job {
                argv,
                envp,
                cwd,
                stdin,
                timeout,
                max_output,
                cpu_seconds: (cpu > 0).then_some(cpu),
            };
            if background {
                let id = st.procs.spawn(&job, &st.conf, st.devnull)?;
                let mut e = Enc::new(tag::OK);
                e.u32(id);
                return Ok(e.0);
            }
            st.reapers
                .run(&job, &st.conf, ctrl, st.devnull)
                .map(encode_outcome)
                .map_err(|m| (errkind::SANDBOX, m))
        }
        tag::PROC_OP => {
            let id = d.u32().map_err(bad)?;
            let what = d.u8().map_err(bad)?;
            let max = [d.u64().map_err(bad)?, d.u64().map_err(bad)?];
            st.procs.op(id, what, max)
        }
        tag::PYTHON => {
            let code = d.bytes().map_err(bad)?;
            let timeout = d.u64().map_err(bad)? as f64 / 1e3;
            let max_output = d.u64().map_err(bad)? as usize;
            let cpu = d.u64().map_err(bad)?;
            let server = match st.py.take() {
                Some(s) => s,
                None => PyServer::start(&st.conf, &st.envp, st.devnull)
                    .map_err(|m| (errkind::SANDBOX, format!("python worker: {m}")))?,
            };
            let (server, r) =
                server.call(&code, timeout, (cpu > 0).then_some(cpu), max_output, ctrl);
            st.py = server;
            r.map(encode_outcome).map_err(|m| (errkind::SANDBOX, m))
        }
        tag::READ => {
            // DATA frames with more=1 carry the chunks; the answer is the last (more=0).
            let path = d.bytes().map_err(bad)?;
            let max = d.u64().map_err(bad)?;
            let mut sock = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(ctrl) });
            let mut emit = |chunk: &[u8]| {
                let mut e = Enc::new(tag::DATA);
                e.u8(1).bytes(chunk);
                wire::write_frame(&mut *sock, &e.0).map_err(|e| format!("send: {e}"))
            };
            files::read(st.root_fd, st.ws_fd, &path, max, &mut emit)
                .map_err(|m| (errkind::PATH, m))?;
            let mut e = Enc::new(tag::DATA);
            e.u8(0).bytes(&[]);
            Ok(e.0)
        }
        tag::WRITE => {
            // OK (or ERROR) once the file is open; then DATA chunks until `len` bytes arrived;
            // the answer says whether all were written (the rest is drained after an error).
            let path = d.bytes().map_err(bad)?;
            let len = d.u64().map_err(bad)?;
            let parents = d.u8().map_err(bad)? != 0;
            let fd = files::create(st.root_fd, st.ws_fd, &path, parents)
                .map_err(|m| (errkind::PATH, m))?;
            let mut sock = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(ctrl) });
            let r = receive_file(&mut sock, fd, &path, len);
            close(fd);
            r.map(|_| Enc::new(tag::OK).0)
        }
        tag::RESET => {
            st.reapers.discard();
            st.procs.kill_all();
            if let Some(py) = st.py.take() {
                py.stop();
            }
            super::reset::remove_ipc();
            super::reset::remove_mqueues(st.mq_fd);
            super::reset::wipe().map_err(|m| (errkind::SANDBOX, m))?;
            Ok(Enc::new(tag::OK).0)
        }
        t => Err((errkind::SANDBOX, format!("unknown request tag {t}"))),
    }
}

fn receive_file(sock: &mut File, fd: RawFd, path: &[u8], len: u64) -> Result<(), (u8, String)> {
    let gone = |e: String| (errkind::SANDBOX, format!("file data: {e}"));
    wire::write_frame(sock, &Enc::new(tag::OK).0).map_err(|e| gone(e.to_string()))?;
    let mut got = 0u64;
    let mut failed = None;
    while got < len {
        let body = match wire::read_frame(sock) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(gone("end of stream".into())),
            Err(e) => return Err(gone(e.to_string())),
        };
        let mut d = Dec::new(&body);
        if d.u8().ok() != Some(tag::DATA) {
            return Err(gone("expected a data frame".into()));
        }
        let chunk = d.bytes().map_err(|e| gone(e.to_string()))?;
        got += chunk.len() as u64;
        if failed.is_none() {
            failed = files::write_chunk(fd, path, &chunk).err();
        }
    }
    match failed {
        Some(m) => Err((errkind::PATH, m)),
        None => Ok(()),
    }
}

/// Runs the inner part; returns the exit code.
/// `lower` is the detached snapshot tree for /workspace (-1: none), idmapped by the outer
/// part before it sends the sync bytes.
pub fn run(p: &Policy, sync_r: RawFd, lower: RawFd) -> i32 {
    // The outer part sends our host pid once the id maps are written.
    let mut b = [0u8; 4];
    // SAFETY: reading four bytes into a valid buffer.
    if unsafe { libc::read(sync_r, b.as_mut_ptr().cast(), 4) } != 4 {
        return 1;
    }
    let host_pid = u32::from_le_bytes(b);
    close(sync_r);
    // SAFETY: process-wide credential and fd setup of a single-threaded process.
    let ctrl = unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong);
        if libc::setresgid(0, 0, 0) != 0 || libc::setresuid(0, 0, 0) != 0 {
            return 1;
        }
        let c = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 10);
        let n = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        libc::dup2(n, 0);
        if n > 2 {
            libc::close(n);
        }
        c
    };
    let mut sock = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(ctrl) });
    let mut st = match setup(p, lower) {
        Ok(s) => s,
        Err(m) => {
            let _ = wire::write_frame(&mut *sock, &wire::error_body(errkind::SETUP, &m));
            return 1;
        }
    };
    let mut ready = Enc::new(tag::READY);
    ready.u32(host_pid);
    if wire::write_frame(&mut *sock, &ready.0).is_err() {
        return 1;
    }
    loop {
        // After each answer, while the host reads it: reap the call's reaper, start the next
        // exec's (best effort; a call without one starts its own).
        st.reapers.prepare(&st.conf, st.devnull);
        let Ok(Some(body)) = wire::read_frame(&mut *sock) else {
            break;
        };
        if body.first() == Some(&tag::CANCEL) {
            continue; // arrived after its call finished
        }
        st.procs.reap();
        let resp = match handle(&mut st, ctrl, &body) {
            Ok(r) => r,
            Err((k, m)) => wire::error_body(k, &m),
        };
        if wire::write_frame(&mut *sock, &resp).is_err() {
            break;
        }
        // The host, just woken, takes its answer before the housekeeping below runs.
        // SAFETY: plain syscall.
        unsafe { libc::sched_yield() };
    }
    if let Some(py) = st.py.take() {
        py.stop();
    }
    0
}

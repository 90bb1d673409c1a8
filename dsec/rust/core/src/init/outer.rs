//! The outer part of the init: host namespaces, root. Joins the cgroups, clones the inner part
//! into the new namespaces, maps its ids, waits for it, then removes the cgroups.

use crate::policy::Policy;
use crate::sys::{clone_fork, close, pipe, write_all_fd, write_path};
use crate::wire::{self, errkind, tag, Dec, Enc};
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;

/// What the host sends first.
pub struct Config {
    pub policy: Policy,
    /// Sandbox cgroup directories (one per hierarchy) and their parents.
    pub cgroups: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Config {
    /// Encodes the config frame body.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new(tag::CONFIG);
        self.policy.encode(&mut e);
        e.u32(self.cgroups.len() as u32);
        for (d, p) in &self.cgroups {
            e.bytes(d).bytes(p);
        }
        e.0
    }

    fn decode(b: &[u8]) -> std::io::Result<Self> {
        let mut d = Dec::new(b);
        if d.u8()? != tag::CONFIG {
            return Err(std::io::Error::other("expected a config frame"));
        }
        let policy = Policy::decode(&mut d)?;
        let n = d.u32()?;
        let mut cgroups = Vec::new();
        for _ in 0..n {
            cgroups.push((d.bytes()?, d.bytes()?));
        }
        Ok(Config { policy, cgroups })
    }
}

fn send(body: &[u8]) {
    let mut f = ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
    let _ = wire::write_frame(&mut *f, body);
}

fn fail(msg: String) -> i32 {
    send(&wire::error_body(errkind::SETUP, &msg));
    1
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Moves this (single-threaded) process into the cgroup `dir`. On v1 it writes "0" to `tasks`:
/// moving only the calling thread skips the write lock on the threadgroup rwsem that moving a
/// whole process takes, and with it the RCU grace period that lock waits for (about 5 ms here,
/// most of a cold start). v2 has no per-thread file outside threaded subtrees: cgroup.procs.
fn move_self(dir: &[u8]) -> std::io::Result<()> {
    let tasks = format!("{}/tasks", s(dir));
    if std::path::Path::new(&tasks).exists() {
        write_path(&tasks, b"0")
    } else {
        write_path(&format!("{}/cgroup.procs", s(dir)), b"0")
    }
}

fn leave_cgroups(cgroups: &[(Vec<u8>, Vec<u8>)]) {
    for (_, parent) in cgroups {
        let _ = move_self(parent);
    }
}

/// Removes the cgroups (this process left them after start-up; leaving again is a no-op
/// for the error paths that run before that).
fn remove_cgroups(cgroups: &[(Vec<u8>, Vec<u8>)]) {
    for (dir, _) in cgroups {
        crate::cgroup::release_memory(std::path::Path::new(&s(dir)));
        for _ in 0..1000 {
            match std::fs::remove_dir(s(dir)) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
            }
        }
    }
}

/// Runs the outer part; returns the process exit code.
pub fn run() -> i32 {
    // Leave the owner's session and process group: a terminal's Ctrl-C or a killpg aimed at
    // the owner must not kill the init behind its back (the owner's death still ends the
    // sandbox through the control socket).
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    let mut ctrl = ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
    let cfg = match wire::read_frame(&mut *ctrl).map(|b| b.map(|b| Config::decode(&b))) {
        Ok(Some(Ok(c))) => c,
        Ok(Some(Err(e))) => return fail(format!("bad config: {e}")),
        _ => return 1,
    };
    for (dir, _) in &cfg.cgroups {
        if let Err(e) = move_self(dir) {
            leave_cgroups(&cfg.cgroups);
            remove_cgroups(&cfg.cgroups);
            return fail(format!("join cgroup {}: {e}", s(dir)));
        }
    }
    let _ = write_path("/proc/self/oom_score_adj", b"-1000");
    // A snapshot's tree, cloned while this process is still host root; the inner part
    // inherits the descriptor and attaches it once it is idmapped (see crate::snapshot).
    let lower = match &cfg.policy.snapshot {
        None => -1,
        Some(path) => match crate::snapshot::clone_tree(path) {
            Ok(fd) => fd,
            Err(m) => {
                leave_cgroups(&cfg.cgroups);
                remove_cgroups(&cfg.cgroups);
                return fail(m);
            }
        },
    };
    let (sync_r, sync_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(format!("pipe: {e}")),
    };
    let mut flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    if !cfg.policy.network {
        flags |= libc::CLONE_NEWNET;
    }
    // The new user namespace is owned by the sandbox's host uid, not by root: the kernel
    // charges what the sandbox holds (inotify instances and watches, namespaces, queued
    // signals) to that uid's budgets on the host, never to root's or another sandbox's.
    let id = cfg.policy.host_id;
    // SAFETY: switching the effective ids of this single-threaded process; the saved ids stay
    // 0, so both calls below restore root.
    let as_owner = unsafe { libc::setegid(id) == 0 && libc::seteuid(id) == 0 };
    let cloned = clone_fork(flags);
    if as_owner && !matches!(cloned, Ok(0)) {
        // SAFETY: as above (the child, if any, is already in its own namespaces).
        unsafe {
            libc::seteuid(0);
            libc::setegid(0);
        }
    }
    let pid = match cloned {
        Ok(p) => p,
        Err(e) => {
            leave_cgroups(&cfg.cgroups);
            remove_cgroups(&cfg.cgroups);
            return fail(format!(
                "clone into new namespaces: {e} (see `python -m dsec check`)"
            ));
        }
    };
    if pid == 0 {
        close(sync_w);
        // SAFETY: exit with the inner part's code.
        unsafe { libc::_exit(super::inner::run(&cfg.policy, sync_r, lower)) };
    }
    close(sync_r);
    // The inner part was born in the sandbox cgroup (and roots its cgroup namespace there);
    // leave it right away (see move_self); at teardown only rmdir is left.
    leave_cgroups(&cfg.cgroups);
    let maps = [
        (format!("/proc/{pid}/setgroups"), "deny".to_string()),
        (format!("/proc/{pid}/uid_map"), format!("0 {id} 1\n")),
        (format!("/proc/{pid}/gid_map"), format!("0 {id} 1\n")),
    ];
    // Best effort: needs CAP_SYS_RESOURCE, which containers often drop.
    let _ = write_path(&format!("/proc/{pid}/oom_score_adj"), b"-1000");
    for (path, val) in &maps {
        if let Err(e) = write_path(path, val.as_bytes()) {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            remove_cgroups(&cfg.cgroups);
            return fail(format!("write {path}: {e}"));
        }
    }
    if lower >= 0 {
        let r = crate::snapshot::idmap_tree(lower, pid);
        close(lower);
        if let Err(m) = r {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            remove_cgroups(&cfg.cgroups);
            return fail(m);
        }
    }
    // The inner part reports our host pid with READY: one wake-up of the owner, not two.
    let _ = write_all_fd(sync_w, &(pid as u32).to_le_bytes());
    close(sync_w);
    close(0);
    let mut st = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut st, 0) } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
    remove_cgroups(&cfg.cgroups);
    0
}

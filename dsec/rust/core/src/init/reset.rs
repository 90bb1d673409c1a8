//! Resetting a sandbox for its next user (`SandboxPool`): the init kills every background
//! process and the warm Python server, empties /workspace, /tmp and /dev/shm, and removes the
//! System V IPC objects and POSIX message queues of its ipc namespace. The namespaces, the
//! cgroup, the uid and the confinement are kept, so a reset costs a few syscalls instead of a
//! new sandbox.
//!
//! Deletion walks each tree with directory fds (`openat(O_NOFOLLOW | O_DIRECTORY)`,
//! `unlinkat`), never following a symlink; the init's `CAP_DAC_OVERRIDE` and `CAP_FOWNER`
//! reach directories the sandbox chmod-ed to 000 or made sticky.

use crate::sys::{close, cstr, dir_names};
use std::os::fd::RawFd;

/// Directories emptied by a reset (their mounts stay).
pub const WIPED: [&str; 3] = ["/workspace", "/tmp", "/dev/shm"];

/// Deletes everything beneath the open directory `dir`; returns the first error.
fn empty_dir(dir: RawFd, depth: u32) -> Result<(), String> {
    if depth > 4096 {
        return Err("directory tree too deep".into());
    }
    let names = dir_names(dir).map_err(|e| format!("list: {e}"))?;
    let mut first = Ok(());
    for name in names {
        let c = cstr(&name).map_err(|e| e.to_string())?;
        // SAFETY: valid C string and directory fd.
        if unsafe { libc::unlinkat(dir, c.as_ptr(), 0) } == 0 {
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EISDIR) {
            first = first.and(Err(format!(
                "unlink {}: {e}",
                String::from_utf8_lossy(&name)
            )));
            continue;
        }
        // SAFETY: valid C string and directory fd.
        let sub = unsafe {
            libc::openat(
                dir,
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if sub < 0 {
            let e = std::io::Error::last_os_error();
            first = first.and(Err(format!("open {}: {e}", String::from_utf8_lossy(&name))));
            continue;
        }
        let r = empty_dir(sub, depth + 1);
        close(sub);
        first = first.and(r);
        // SAFETY: valid C string and directory fd.
        if unsafe { libc::unlinkat(dir, c.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            let e = std::io::Error::last_os_error();
            first = first.and(Err(format!(
                "rmdir {}: {e}",
                String::from_utf8_lossy(&name)
            )));
        }
    }
    first
}

/// Empties the directories of [`WIPED`] and restores their modes.
pub fn wipe() -> Result<(), String> {
    for (path, mode) in WIPED.iter().zip([0o755, 0o1777, 0o1777]) {
        let c = cstr(path.as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: valid C string.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(format!("open {path}: {}", std::io::Error::last_os_error()));
        }
        let r = empty_dir(fd, 0);
        // SAFETY: fchmod/fchown on a directory fd we own.
        unsafe {
            libc::fchmod(fd, mode);
            libc::fchown(fd, 0, 0);
        }
        close(fd);
        r.map_err(|m| format!("wipe {path}: {m}"))?;
    }
    Ok(())
}

/// Removes every System V shared memory segment, semaphore set and message queue of the
/// sandbox's ipc namespace (listed in its /proc/sysvipc).
pub fn remove_ipc() {
    for (file, kind) in [("shm", 0), ("sem", 1), ("msg", 2)] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/sysvipc/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let Some(id) = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()) else {
                continue;
            };
            // SAFETY: IPC_RMID with a null buffer on an id of our own namespace.
            unsafe {
                match kind {
                    0 => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                    1 => libc::semctl(id, 0, libc::IPC_RMID),
                    _ => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                };
            }
        }
    }
}

/// A detached mount of the ipc namespace's mqueue filesystem (never attached to a path, so the
/// sandbox cannot see it), made during setup while the init may still mount: the reset lists
/// and unlinks the POSIX message queues through it. -1 when the kernel has no mqueue support.
pub fn mqueue_fd() -> RawFd {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    const NOSUID_NODEV_NOEXEC: libc::c_uint = 0x2 | 0x4 | 0x8;
    // SAFETY: the new mount API with valid arguments; every fd is ours to close.
    unsafe {
        let fs = libc::syscall(libc::SYS_fsopen, c"mqueue".as_ptr(), FSOPEN_CLOEXEC) as RawFd;
        if fs < 0 {
            return -1;
        }
        let null = std::ptr::null::<libc::c_char>();
        let m = if libc::syscall(libc::SYS_fsconfig, fs, FSCONFIG_CMD_CREATE, null, null, 0) == 0 {
            libc::syscall(libc::SYS_fsmount, fs, FSMOUNT_CLOEXEC, NOSUID_NODEV_NOEXEC) as RawFd
        } else {
            -1
        };
        close(fs);
        m
    }
}

/// Unlinks every POSIX message queue of the sandbox (`mq`: from [`mqueue_fd`]); a queue still
/// open in some process lives on until closed, like an unlinked file, but no reset leaves one
/// reachable by name. Best effort.
pub fn remove_mqueues(mq: RawFd) {
    if mq < 0 {
        return;
    }
    for name in dir_names(mq).unwrap_or_default() {
        if let Ok(c) = cstr(&name) {
            // SAFETY: valid C string and directory fd.
            unsafe { libc::unlinkat(mq, c.as_ptr(), 0) };
        }
    }
}

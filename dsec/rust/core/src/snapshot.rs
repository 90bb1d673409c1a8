//! Snapshots of a sandbox's /workspace and the copy-on-write layer of a fork.
//!
//! A snapshot is a plain directory tree on the host (directories, regular files, symlinks and
//! their modes; owned by host root, which no sandbox maps). [`export`] copies a live
//! sandbox's /workspace into one, reading it from the host through `/proc/<init>/root` one
//! name at a time (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so nothing the
//! sandbox put there (symlinks, fifos, devices) can redirect the copy.
//!
//! A sandbox started from a snapshot mounts its /workspace as an overlay: the snapshot tree
//! is the read-only lower layer, a tmpfs of `disk_bytes` holds the upper layer, so nothing is
//! copied at start and what the sandbox writes is bounded as before. The outer init clones the
//! tree (`open_tree(OPEN_TREE_CLONE)`) before it creates the namespaces and, once the uid map
//! is written, makes the clone read-only and idmapped through the sandbox's user namespace
//! (`mount_setattr(MOUNT_ATTR_IDMAP)`): files owned by host root appear owned by the
//! sandbox's root, so the sandbox may change them (the overlay copies them up first). The
//! inner init attaches the clone with `move_mount` and mounts the overlay
//! (`userxattr`, as overlayfs requires inside a user namespace).

use crate::sys::{close, cstr, cvt};
use crate::{Error, Result};
use std::os::fd::RawFd;
use std::path::Path;

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// What [`export`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    /// Directories (the root not counted), regular files and symlinks.
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    /// Bytes of regular files.
    pub bytes: u64,
    /// Entries left out: fifos, sockets, device nodes.
    pub skipped: u64,
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn os_err(what: &str, p: &[u8]) -> Error {
    Error::Sandbox(format!(
        "snapshot: {what} {:?}: {}",
        String::from_utf8_lossy(p),
        std::io::Error::last_os_error()
    ))
}

/// `openat2(base, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`.
fn open_beneath(base: RawFd, rel: &[u8], flags: i32) -> Result<RawFd> {
    let c = cstr(if rel.is_empty() { b"." } else { rel })
        .map_err(|_| Error::Sandbox("snapshot: a name contains a NUL byte".into()))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: valid C string and open_how struct.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            base,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(os_err("open", rel));
    }
    Ok(fd as RawFd)
}

fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    if a.is_empty() {
        return b.to_vec();
    }
    [a, b"/", b].concat()
}

/// Names in a directory fd (without `.` and `..`), sorted.
fn names(dir: RawFd) -> Result<Vec<Vec<u8>>> {
    let mut out =
        crate::sys::dir_names(dir).map_err(|e| Error::Sandbox(format!("snapshot: list: {e}")))?;
    out.sort();
    Ok(out)
}

fn fstatat(dir: RawFd, name: &[u8]) -> Result<libc::stat> {
    let c = cstr(name).map_err(|_| Error::Sandbox("snapshot: bad name".into()))?;
    // SAFETY: st is a valid buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })
        .map_err(|_| os_err("stat", name))?;
    Ok(st)
}

/// Copies the regular file `name` of `sdir` into `ddir` with `mode`; returns its size.
fn copy_file(sdir: RawFd, ddir: RawFd, name: &[u8], mode: u32) -> Result<u64> {
    let src = open_beneath(sdir, name, libc::O_RDONLY | libc::O_NONBLOCK)?;
    // SAFETY: st is a valid buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(src, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        close(src);
        return Err(Error::Sandbox(format!(
            "snapshot: {:?} changed while it was copied",
            String::from_utf8_lossy(name)
        )));
    }
    let c = cstr(name).map_err(|_| Error::Sandbox("snapshot: bad name".into()))?;
    // SAFETY: valid C string and directory fd.
    let dst = unsafe {
        libc::openat(
            ddir,
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o600,
        )
    };
    if dst < 0 {
        close(src);
        return Err(os_err("create", name));
    }
    // SAFETY: both fds are ours; File takes ownership and closes them.
    let (mut r, mut w) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(src),
            std::fs::File::from_raw_fd(dst),
        )
    };
    let n = std::io::copy(&mut r, &mut w).map_err(|e| {
        Error::Sandbox(format!(
            "snapshot: copy {:?}: {e}",
            String::from_utf8_lossy(name)
        ))
    })?;
    use std::os::fd::AsRawFd;
    // SAFETY: fchmod on an fd we own.
    unsafe { libc::fchmod(w.as_raw_fd(), mode) };
    Ok(n)
}

/// Copies the tree beneath `src` (an open directory) into the existing empty directory
/// `dest`: directories, regular files and symlinks with their permission bits (set-id bits
/// dropped); everything else is counted as skipped. Iterative, one directory open at a time.
pub fn copy_tree(src: RawFd, dest: &Path) -> Result<Exported> {
    let dfd = std::fs::File::open(dest)
        .map_err(|e| Error::Sandbox(format!("snapshot: open {}: {e}", dest.display())))?;
    use std::os::fd::AsRawFd;
    let droot = dfd.as_raw_fd();
    let mut out = Exported::default();
    let mut todo: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = todo.pop() {
        let sdir = open_beneath(src, &rel, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let ddir = match open_beneath(droot, &rel, libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) => {
                close(sdir);
                return Err(e);
            }
        };
        let r = (|| -> Result<()> {
            for name in names(sdir)? {
                let st = fstatat(sdir, &name)?;
                let mode = st.st_mode & 0o1777;
                let c = cstr(&name).map_err(|_| Error::Sandbox("snapshot: bad name".into()))?;
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFDIR => {
                        // SAFETY: valid C string and directory fd.
                        cvt(unsafe { libc::mkdirat(ddir, c.as_ptr(), 0o700) })
                            .map_err(|_| os_err("mkdir", &name))?;
                        todo.push(join(&rel, &name));
                        out.dirs += 1;
                    }
                    libc::S_IFREG => {
                        out.bytes += copy_file(sdir, ddir, &name, mode)?;
                        out.files += 1;
                    }
                    libc::S_IFLNK => {
                        let mut buf = vec![0u8; libc::PATH_MAX as usize];
                        // SAFETY: buf is valid for its length.
                        let n = unsafe {
                            libc::readlinkat(sdir, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                        };
                        if n < 0 {
                            return Err(os_err("readlink", &name));
                        }
                        buf.truncate(n as usize);
                        let to =
                            cstr(&buf).map_err(|_| Error::Sandbox("snapshot: bad link".into()))?;
                        // SAFETY: valid C strings and directory fd.
                        cvt(unsafe { libc::symlinkat(to.as_ptr(), ddir, c.as_ptr()) })
                            .map_err(|_| os_err("symlink", &name))?;
                        out.symlinks += 1;
                    }
                    _ => out.skipped += 1,
                }
            }
            // Directory modes last, so a read-only directory could still be filled.
            let st = fstatat(sdir, b".")?;
            // SAFETY: fchmod on an fd we own (an O_RDONLY directory fd).
            unsafe { libc::fchmod(ddir, st.st_mode & 0o1777) };
            Ok(())
        })();
        close(sdir);
        close(ddir);
        r?;
    }
    Ok(out)
}

/// Clones the tree at `path` as a detached mount (`open_tree(OPEN_TREE_CLONE)`); the caller
/// must be host root. The fd is not close-on-exec-relevant: the init never execs.
pub fn clone_tree(path: &[u8]) -> std::result::Result<RawFd, String> {
    let c = cstr(path).map_err(|_| "snapshot path contains a NUL byte".to_string())?;
    // SAFETY: valid C string.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(format!(
            "snapshot {:?}: open_tree: {}",
            String::from_utf8_lossy(path),
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd as RawFd)
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes the detached tree `fd` read-only, nosuid, nodev and idmapped through the user
/// namespace of `pid` (its root sees host root's files as its own).
pub fn idmap_tree(fd: RawFd, pid: libc::pid_t) -> std::result::Result<(), String> {
    let ns = format!("/proc/{pid}/ns/user");
    let c = cstr(ns.as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid C string.
    let ufd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if ufd < 0 {
        return Err(format!("open {ns}: {}", std::io::Error::last_os_error()));
    }
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: ufd as u64,
    };
    // SAFETY: valid fd, empty path and mount_attr struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    let e = std::io::Error::last_os_error();
    close(ufd);
    if r != 0 {
        return Err(format!(
            "idmapped snapshot mount: {e} (the snapshot's file system must support idmapped \
             mounts: tmpfs, ext4, xfs, btrfs; not overlayfs)"
        ));
    }
    Ok(())
}

/// In the inner init, before `pivot_root`: mounts `ws` (an empty tmpfs of `disk_bytes`, later
/// /workspace) over itself as an overlay whose lower layer is the detached tree `fd`, and
/// whose upper and work directories live in that tmpfs (hidden beneath the overlay).
pub fn mount_overlay(fd: RawFd, ws: &str) -> std::result::Result<(), String> {
    for d in ["lower", "upper", "work"] {
        std::fs::create_dir(format!("{ws}/{d}")).map_err(|e| format!("mkdir {ws}/{d}: {e}"))?;
    }
    let lower = cstr(format!("{ws}/lower").as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid fd, empty path and C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            lower.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(format!(
            "attach the snapshot: {}",
            std::io::Error::last_os_error()
        ));
    }
    close(fd);
    std::fs::set_permissions(
        format!("{ws}/upper"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| format!("chmod upper: {e}"))?;
    let opts = format!("lowerdir={ws}/lower,upperdir={ws}/upper,workdir={ws}/work,userxattr");
    crate::mounts::mount(
        Some("overlay"),
        ws,
        Some("overlay"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&opts),
    )
    .map_err(|e| format!("overlay on /workspace: {e}"))
}

/// Copies a live sandbox's /workspace (seen from the host through `/proc/<pid>/root`) into
/// the empty directory `dest`.
pub fn export(init_pid: u32, dest: &Path) -> Result<Exported> {
    let ws = format!("/proc/{init_pid}/root/workspace");
    let c = cstr(ws.as_bytes()).map_err(|e| Error::Sandbox(e.to_string()))?;
    // SAFETY: valid C string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::Sandbox(format!(
            "snapshot: open {ws}: {} (needs host root)",
            std::io::Error::last_os_error()
        )));
    }
    let r = copy_tree(fd, dest);
    close(fd);
    r
}

//! The landlock ruleset as data and its application with the raw landlock system calls.
//! Read-only: the image and /dev, /proc; read-write: /workspace, /tmp, /dev/shm and the
//! writable device nodes. TCP is left to the network namespace (a private netns has only
//! loopback, which sandboxed servers may use). Abstract unix sockets and signals are scoped to
//! the domain (ABI >= 6), so a sandboxed process cannot signal the init.

use std::io;
use std::os::fd::RawFd;

pub const EXECUTE: u64 = 1 << 0;
pub const WRITE_FILE: u64 = 1 << 1;
pub const READ_FILE: u64 = 1 << 2;
pub const READ_DIR: u64 = 1 << 3;
pub const REMOVE_DIR: u64 = 1 << 4;
pub const REMOVE_FILE: u64 = 1 << 5;
pub const MAKE_CHAR: u64 = 1 << 6;
pub const MAKE_DIR: u64 = 1 << 7;
pub const MAKE_REG: u64 = 1 << 8;
pub const MAKE_SOCK: u64 = 1 << 9;
pub const MAKE_FIFO: u64 = 1 << 10;
pub const MAKE_BLOCK: u64 = 1 << 11;
pub const MAKE_SYM: u64 = 1 << 12;
pub const REFER: u64 = 1 << 13;
pub const TRUNCATE: u64 = 1 << 14;
pub const IOCTL_DEV: u64 = 1 << 15;
/// Rights that apply to non-directories.
pub const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

/// Access class of one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read and execute.
    ReadOnly,
    /// Everything but creating device nodes.
    ReadWrite,
    /// Read, write and ioctl on device nodes (files only).
    Device,
}

/// One path-beneath rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub path: &'static str,
    pub access: Access,
}

/// The rules (pure data). Paths that do not exist in a sandbox are skipped when applied.
pub fn rules() -> Vec<Rule> {
    let ro = |path| Rule {
        path,
        access: Access::ReadOnly,
    };
    let rw = |path| Rule {
        path,
        access: Access::ReadWrite,
    };
    let dev = |path| Rule {
        path,
        access: Access::Device,
    };
    vec![
        ro("/usr"),
        ro("/bin"),
        ro("/sbin"),
        ro("/lib"),
        ro("/lib32"),
        ro("/lib64"),
        ro("/libx32"),
        ro("/etc"),
        ro("/dev"),
        ro("/proc"),
        rw("/workspace"),
        rw("/tmp"),
        rw("/dev/shm"),
        dev("/dev/null"),
        dev("/dev/zero"),
        dev("/dev/full"),
        dev("/dev/random"),
        dev("/dev/urandom"),
        dev("/dev/tty"),
    ]
}

/// Filesystem rights handled at an ABI version.
pub fn handled_fs(abi: u32) -> u64 {
    let mut m = (1 << 13) - 1;
    if abi >= 2 {
        m |= REFER;
    }
    if abi >= 3 {
        m |= TRUNCATE;
    }
    if abi >= 5 {
        m |= IOCTL_DEV;
    }
    m
}

/// The access mask of a rule at an ABI version, for a directory or not.
pub fn mask(access: Access, abi: u32, is_dir: bool) -> u64 {
    let m = match access {
        Access::ReadOnly => EXECUTE | READ_FILE | READ_DIR | IOCTL_DEV,
        Access::ReadWrite => handled_fs(abi) & !(MAKE_CHAR | MAKE_BLOCK),
        Access::Device => READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV,
    };
    let m = m & handled_fs(abi);
    if is_dir {
        m
    } else {
        m & FILE_RIGHTS
    }
}

#[repr(C)]
struct RulesetAttr {
    fs: u64,
    net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneath {
    allowed: u64,
    parent_fd: i32,
}

/// The landlock ABI version of the running kernel (0 when unsupported or disabled).
pub fn abi_version() -> u32 {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION query with a null attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    if r < 0 {
        0
    } else {
        r as u32
    }
}

/// Creates the ruleset fd for `abi` (> 0). Call before forking children that apply it.
pub fn create_ruleset(abi: u32) -> io::Result<RawFd> {
    let attr = RulesetAttr {
        fs: handled_fs(abi),
        net: 0,
        scoped: if abi >= 6 { 3 } else { 0 },
    };
    let size = if abi >= 6 {
        24
    } else if abi >= 4 {
        16
    } else {
        8
    };
    // SAFETY: attr is valid for `size` bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            size,
            0u32,
        )
    };
    let fd = crate::sys::cvt(fd)? as RawFd;
    for rule in rules() {
        let p = crate::sys::cstr(rule.path.as_bytes())?;
        // SAFETY: p is a valid C string.
        let pfd = unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if pfd < 0 {
            continue;
        }
        // SAFETY: st is a valid stat buffer for fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let is_dir =
            unsafe { libc::fstat(pfd, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let pb = PathBeneath {
            allowed: mask(rule.access, abi, is_dir),
            parent_fd: pfd,
        };
        // SAFETY: pb is a valid landlock_path_beneath_attr.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                fd,
                1u32,
                &pb as *const PathBeneath,
                0u32,
            )
        };
        crate::sys::close(pfd);
        if r < 0 {
            let e = io::Error::last_os_error();
            crate::sys::close(fd);
            return Err(io::Error::other(format!(
                "landlock_add_rule {}: {e}",
                rule.path
            )));
        }
    }
    Ok(fd)
}

/// Enforces a ruleset on the calling thread (no_new_privs must be set).
pub fn restrict_self(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) };
    crate::sys::cvt(r).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_ro_image_rw_workspace() {
        let r = rules();
        let find = |p: &str| r.iter().find(|x| x.path == p).map(|x| x.access);
        assert_eq!(find("/usr"), Some(Access::ReadOnly));
        assert_eq!(find("/etc"), Some(Access::ReadOnly));
        assert_eq!(find("/proc"), Some(Access::ReadOnly));
        assert_eq!(find("/workspace"), Some(Access::ReadWrite));
        assert_eq!(find("/tmp"), Some(Access::ReadWrite));
        assert_eq!(find("/dev/null"), Some(Access::Device));
        assert_eq!(find("/"), None, "the root itself is not granted");
    }

    #[test]
    fn masks_respect_abi_and_file_kind() {
        assert_eq!(handled_fs(1), (1 << 13) - 1);
        assert_eq!(handled_fs(7), (1 << 16) - 1);
        let ro = mask(Access::ReadOnly, 7, true);
        assert_eq!(ro & (WRITE_FILE | MAKE_REG | REMOVE_FILE), 0);
        assert_eq!(mask(Access::ReadOnly, 1, true) & IOCTL_DEV, 0);
        let rw = mask(Access::ReadWrite, 7, true);
        assert!(rw & WRITE_FILE != 0 && rw & MAKE_CHAR == 0 && rw & MAKE_BLOCK == 0);
        assert_eq!(mask(Access::ReadWrite, 7, false) & !FILE_RIGHTS, 0);
        assert_eq!(
            mask(Access::Device, 7, false),
            READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV
        );
    }
}

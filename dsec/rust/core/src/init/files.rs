//! The file API, served by the init with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//! rooted at the sandbox root (absolute paths) or at /workspace (relative paths). Only regular
//! files outside procfs are read or written. Both directions stream in chunks of at most
//! [`CHUNK`] bytes, so the init never holds a whole file (its memory is the sandbox's).

use crate::sys::{close, cstr};
use std::os::fd::RawFd;

/// Largest file read_file returns.
pub const MAX_READ: u64 = 1 << 30;
/// Bytes per data frame of the file API.
pub const CHUNK: usize = 1 << 20;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

#[allow(clippy::unnecessary_cast)] // f_type's integer type differs between targets
fn is_proc(sf: &libc::statfs) -> bool {
    sf.f_type as i64 == PROC_SUPER_MAGIC
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn describe(path: &[u8], e: i32) -> String {
    let p = String::from_utf8_lossy(path);
    let why = match e {
        libc::EXDEV => "escapes the sandbox root".to_string(),
        libc::ELOOP => "goes through a symlink that leaves the sandbox or a magic link".to_string(),
        libc::EROFS => "is on a read-only part of the sandbox".to_string(),
        libc::ENOSPC => "no space left on its mount (sized by disk_bytes, at most 3/8 of \
            memory_bytes less headroom; see Sandbox.limits['tmpfs_bytes'])"
            .to_string(),
        libc::EFBIG => "file too large (disk_bytes)".to_string(),
        _ => std::io::Error::from_raw_os_error(e).to_string(),
    };
    format!("path {p:?}: {why}")
}

fn open(root: RawFd, ws: RawFd, path: &[u8], flags: i32) -> Result<RawFd, String> {
    let (base, rel) = match path.iter().position(|&b| b != b'/') {
        _ if path.first() != Some(&b'/') => (ws, path),
        Some(i) => (root, &path[i..]),
        None => (root, &b"."[..]),
    };
    let c = cstr(rel).map_err(|_| {
        format!(
            "path {:?} contains a NUL byte",
            String::from_utf8_lossy(path)
        )
    })?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64,
        mode: if flags & libc::O_CREAT != 0 { 0o644 } else { 0 },
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
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
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err(describe(path, e));
    }
    let fd = fd as RawFd;
    // SAFETY: st/sf are valid buffers for fstat/fstatfs.
    let (mut st, mut sf): (libc::stat, libc::statfs) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let ok = unsafe { libc::fstat(fd, &mut st) == 0 && libc::fstatfs(fd, &mut sf) == 0 };
    let p = String::from_utf8_lossy(path);
    let err = if !ok {
        Some(format!("path {p:?}: cannot stat"))
    } else if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        Some(format!("path {p:?}: is a directory"))
    } else if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        Some(format!("path {p:?}: not a regular file"))
    } else if is_proc(&sf) {
        Some(format!(
            "path {p:?}: procfs is not accessible through the file API"
        ))
    } else if flags & libc::O_CREAT == 0 && st.st_size as u64 > MAX_READ {
        Some(format!("path {p:?}: larger than {MAX_READ} bytes"))
    } else {
        None
    };
    match err {
        Some(m) => {
            close(fd);
            Err(m)
        }
        None => Ok(fd),
    }
}

fn too_big(path: &[u8], size: u64, max: u64) -> String {
    format!(
        "path {:?}: {size} bytes, more than max_bytes={max}",
        String::from_utf8_lossy(path)
    )
}

/// Reads a regular file of at most `max` bytes, handing it to `emit` chunk by chunk (at most
/// [`CHUNK`] bytes each); a file larger than `max` (by its size, or by what reading finds) is
/// an error naming both numbers.
pub fn read(
    root: RawFd,
    ws: RawFd,
    path: &[u8],
    max: u64,
    emit: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let fd = open(root, ws, path, libc::O_RDONLY)?;
    let r = read_fd(fd, path, max, emit);
    close(fd);
    r
}

fn read_fd(
    fd: RawFd,
    path: &[u8],
    max: u64,
    emit: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    // SAFETY: st is a valid buffer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_size as u64 > max {
        return Err(too_big(path, st.st_size as u64, max));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        // SAFETY: buf is valid.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if e == libc::EINTR {
                continue;
            }
            return Err(describe(path, e));
        }
        if n == 0 {
            return Ok(());
        }
        total += n as u64;
        if total > max {
            return Err(too_big(path, total, max));
        }
        emit(&buf[..n as usize])?;
    }
}

/// Creates or truncates a regular file for writing; the caller writes chunks with
/// [`write_chunk`] and closes it. With `parents`, missing directories on the way are created
/// first (mode 0755), each resolved beneath the same root as the file.
pub fn create(root: RawFd, ws: RawFd, path: &[u8], parents: bool) -> Result<RawFd, String> {
    if parents {
        make_parents(root, ws, path)?;
    }
    open(
        root,
        ws,
        path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
    )
}

/// Opens a directory with the file API's resolution rules (`O_PATH`).
fn open_dir(root: RawFd, ws: RawFd, path: &[u8]) -> Result<RawFd, i32> {
    let (base, rel) = match path.iter().position(|&b| b != b'/') {
        _ if path.first() != Some(&b'/') => (ws, path),
        Some(i) => (root, &path[i..]),
        None => (root, &b"."[..]),
    };
    let c = cstr(rel).map_err(|_| libc::EINVAL)?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
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
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(fd as RawFd)
}

/// Creates the missing directories above `path`: each one is made with `mkdirat` on a single
/// name inside its parent, which was itself opened beneath the root, so no directory is
/// created outside it (symlinks and `..` are judged by `openat2` like the file's own path).
fn make_parents(root: RawFd, ws: RawFd, path: &[u8]) -> Result<(), String> {
    let Some(cut) = path.iter().rposition(|&b| b == b'/') else {
        return Ok(()); // a name directly in /workspace
    };
    let dir = &path[..cut];
    let lead = if path.first() == Some(&b'/') { 1 } else { 0 };
    let mut end = lead;
    loop {
        let next = dir[end..]
            .iter()
            .position(|&b| b == b'/')
            .map_or(dir.len(), |i| end + i);
        let prefix = &dir[..next];
        let name = &dir[end..next];
        if !name.is_empty() && name != b"." && name != b".." {
            match open_dir(root, ws, prefix) {
                Ok(fd) => close(fd),
                Err(libc::ENOENT) => {
                    let parent = &dir[..end.saturating_sub(1).max(lead)];
                    let pfd = if parent.is_empty() {
                        open_dir(root, ws, b".")
                    } else {
                        open_dir(root, ws, parent)
                    }
                    .map_err(|e| describe(parent, e))?;
                    let c = cstr(name).map_err(|_| describe(path, libc::EINVAL))?;
                    // SAFETY: valid C string and a directory fd we own.
                    let r = unsafe { libc::mkdirat(pfd, c.as_ptr(), 0o755) };
                    let e = std::io::Error::last_os_error().raw_os_error();
                    close(pfd);
                    if r != 0 && e != Some(libc::EEXIST) {
                        return Err(describe(prefix, e.unwrap_or(libc::EIO)));
                    }
                }
                Err(e) => return Err(describe(prefix, e)),
            }
        }
        if next >= dir.len() {
            return Ok(());
        }
        end = next + 1;
    }
}

/// Writes one chunk of a file opened by [`create`].
pub fn write_chunk(fd: RawFd, path: &[u8], data: &[u8]) -> Result<(), String> {
    crate::sys::write_all_fd(fd, data)
        .map_err(|e| describe(path, e.raw_os_error().unwrap_or(libc::EIO)))
}

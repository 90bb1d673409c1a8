//! The mount plan of a sandbox root as data ([`plan`]), and its execution inside the new mount
//! namespace ([`apply`]) followed by `pivot_root` and a read-only remount of the root.

use crate::sys::{cstr, cvt};
use std::io;

/// Top-level image entries bound read-only when present.
pub const IMAGE_DIRS: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Files and directories of the image's /etc bound read-only when present.
pub const ETC_BINDS: [&str; 4] = ["ld.so.cache", "ld.so.conf", "alternatives", "localtime"];
/// Device nodes bound from the host.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// /proc entries re-bound read-only.
pub const PROC_RO: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];
/// /proc entries hidden behind /dev/null.
pub const PROC_MASKED: [&str; 5] = ["kcore", "keys", "timer_list", "kallsyms", "sched_debug"];

/// What an image entry is on the host (probed, then fed to the pure planner).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File,
    Symlink(String),
    Missing,
}

/// One step of building the root. Targets are absolute paths inside the new root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A tmpfs with a size limit (bytes) and mode.
    Tmpfs {
        target: String,
        size: u64,
        mode: u32,
        noexec: bool,
    },
    /// A read-only bind of a host path (`dir` selects mkdir vs an empty file as mount point).
    BindRo {
        src: String,
        target: String,
        dir: bool,
    },
    /// A read-write bind of a host device node.
    BindDev { src: String, target: String },
    /// A symlink `target -> to`.
    Symlink { target: String, to: String },
    /// A file with fixed contents.
    File { target: String, contents: String },
    /// A fresh procfs.
    Proc { target: String },
    /// Bind a path onto itself read-only (procfs entries).
    RoSelf { target: String },
    /// Hide a file behind /dev/null.
    Mask { target: String },
    /// Make an already mounted tmpfs read-only.
    RemountRo { target: String },
}

/// Inputs of the planner.
pub struct PlanInput<'a> {
    /// Source prefix of the image ("" for the host root).
    pub image: &'a str,
    /// Probe result per [`IMAGE_DIRS`] entry.
    pub image_entries: Vec<(&'static str, Entry)>,
    /// Probe result per [`ETC_BINDS`] entry.
    pub etc_entries: Vec<(&'static str, Entry)>,
    /// Size of /workspace and /tmp each.
    pub disk_bytes: u64,
    /// Size of /dev/shm.
    pub shm_bytes: u64,
}

const PASSWD: &str = "root:x:0:0:root:/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files\n";

/// The mount plan (pure data; the order matters: /dev before the /proc masks).
pub fn plan(inp: &PlanInput<'_>) -> Vec<Step> {
    let mut s = Vec::new();
    for (name, e) in &inp.image_entries {
        let target = format!("/{name}");
        match e {
            Entry::Dir => s.push(Step::BindRo {
                src: format!("{}/{name}", inp.image),
                target,
                dir: true,
            }),
            Entry::Symlink(to) => s.push(Step::Symlink {
                target,
                to: to.clone(),
            }),
            Entry::File | Entry::Missing => {}
        }
    }
    s.push(Step::Tmpfs {
        target: "/etc".into(),
        size: 1 << 20,
        mode: 0o755,
        noexec: true,
    });
    for (target, contents) in [
        ("/etc/passwd", PASSWD),
        ("/etc/group", GROUP),
        ("/etc/hosts", HOSTS),
        ("/etc/nsswitch.conf", NSSWITCH),
        ("/etc/hostname", "sandbox\n"),
    ] {
        s.push(Step::File {
            target: target.into(),
            contents: contents.into(),
        });
    }
    for (name, e) in &inp.etc_entries {
        let src = format!("{}/etc/{name}", inp.image);
        let target = format!("/etc/{name}");
        match e {
            Entry::Dir => s.push(Step::BindRo {
                src,
                target,
                dir: true,
            }),
            Entry::File => s.push(Step::BindRo {
                src,
                target,
                dir: false,
            }),
            Entry::Symlink(to) => s.push(Step::Symlink {
                target,
                to: to.clone(),
            }),
            Entry::Missing => {}
        }
    }
    s.push(Step::RemountRo {
        target: "/etc".into(),
    });
    let d = inp.disk_bytes;
    s.push(Step::Tmpfs {
        target: "/workspace".into(),
        size: d,
        mode: 0o755,
        noexec: false,
    });
    s.push(Step::Tmpfs {
        target: "/tmp".into(),
        size: d,
        mode: 0o1777,
        noexec: false,
    });
    s.push(Step::Tmpfs {
        target: "/dev".into(),
        size: 64 << 10,
        mode: 0o755,
        noexec: true,
    });
    for dev in DEVICES {
        s.push(Step::BindDev {
            src: format!("/dev/{dev}"),
            target: format!("/dev/{dev}"),
        });
    }
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        s.push(Step::Symlink {
            target: format!("/dev/{name}"),
            to: to.into(),
        });
    }
    s.push(Step::Tmpfs {
        target: "/dev/shm".into(),
        size: inp.shm_bytes,
        mode: 0o1777,
        noexec: true,
    });
    s.push(Step::RemountRo {
        target: "/dev".into(),
    });
    s.push(Step::Proc {
        target: "/proc".into(),
    });
    for p in PROC_RO {
        s.push(Step::RoSelf {
            target: format!("/proc/{p}"),
        });
    }
    for p in PROC_MASKED {
        s.push(Step::Mask {
            target: format!("/proc/{p}"),
        });
    }
    s
}

/// Probes the image entries on the host.
pub fn probe(path: &str) -> Entry {
    match std::fs::symlink_metadata(path) {
        Err(_) => Entry::Missing,
        Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(path) {
            Ok(t) => Entry::Symlink(t.to_string_lossy().into_owned()),
            Err(_) => Entry::Missing,
        },
        Ok(m) if m.is_dir() => Entry::Dir,
        Ok(_) => Entry::File,
    }
}

/// `mount(2)` with optional strings; the error names the target.
pub fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: u64,
    data: Option<&str>,
) -> io::Result<()> {
    let c = |s: Option<&str>| s.map(|x| cstr(x.as_bytes())).transpose();
    let (src, tgt, fst, dat) = (c(src)?, cstr(target.as_bytes())?, c(fstype)?, c(data)?);
    let p = |x: &Option<std::ffi::CString>| x.as_ref().map_or(std::ptr::null(), |v| v.as_ptr());
    // SAFETY: all pointers are valid C strings or null.
    let r = unsafe {
        libc::mount(
            p(&src),
            tgt.as_ptr(),
            p(&fst),
            flags as libc::c_ulong,
            p(&dat).cast(),
        )
    };
    cvt(r)
        .map(|_| ())
        .map_err(|e| io::Error::new(e.kind(), format!("mount {target}: {e}")))
}

/// Flags of an existing mount that must be kept when remounting it (locked in a userns).
fn kept_flags(target: &str) -> u64 {
    let Ok(c) = cstr(target.as_bytes()) else {
        return 0;
    };
    // SAFETY: sv is a valid statvfs buffer.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut sv) } != 0 {
        return 0;
    }
    let f = sv.f_flag;
    let mut m = 0u64;
    for (st, ms) in [
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
    ] {
        if f & st != 0 {
            m |= ms;
        }
    }
    m
}

fn remount_ro(target: &str) -> io::Result<()> {
    let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID;
    mount(None, target, None, flags | kept_flags(target), None)
}

fn mkdir(p: &str) -> io::Result<()> {
    match std::fs::create_dir(p) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(io::Error::new(e.kind(), format!("mkdir {p}: {e}")))
        }
        _ => Ok(()),
    }
}

fn touch(p: &str) -> io::Result<()> {
    std::fs::write(p, b"").map_err(|e| io::Error::new(e.kind(), format!("create {p}: {e}")))
}

/// Executes the plan under `root` (a tmpfs mount point in the new mount namespace).
pub fn apply(root: &str, steps: &[Step]) -> io::Result<()> {
    let at = |t: &str| format!("{root}{t}");
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    for st in steps {
        match st {
            Step::Tmpfs {
                target,
                size,
                mode,
                noexec,
            } => {
                let t = at(target);
                mkdir(&t)?;
                let fl = nosuid | if *noexec { libc::MS_NOEXEC } else { 0 };
                mount(
                    Some("tmpfs"),
                    &t,
                    Some("tmpfs"),
                    fl,
                    Some(&format!("size={size},mode={mode:o}")),
                )?;
            }
            Step::BindRo { src, target, dir } => {
                let t = at(target);
                if *dir {
                    mkdir(&t)?
                } else {
                    touch(&t)?
                }
                mount(Some(src), &t, None, libc::MS_BIND, None)?;
                remount_ro(&t)?;
            }
            Step::BindDev { src, target } => {
                let t = at(target);
                touch(&t)?;
                mount(Some(src), &t, None, libc::MS_BIND, None)?;
            }
            Step::Symlink { target, to } => {
                std::os::unix::fs::symlink(to, at(target))?;
            }
            Step::File { target, contents } => {
                std::fs::write(at(target), contents)?;
            }
            Step::Proc { target } => {
                let t = at(target);
                mkdir(&t)?;
                mount(
                    Some("proc"),
                    &t,
                    Some("proc"),
                    nosuid | libc::MS_NOEXEC,
                    None,
                )?;
            }
            Step::RoSelf { target } => {
                let t = at(target);
                if std::fs::symlink_metadata(&t).is_err() {
                    continue;
                }
                mount(Some(&t), &t, None, libc::MS_BIND | libc::MS_REC, None)?;
                remount_ro(&t)?;
            }
            Step::Mask { target } => {
                let t = at(target);
                if std::fs::symlink_metadata(&t).is_err() {
                    continue;
                }
                mount(Some(&at("/dev/null")), &t, None, libc::MS_BIND, None)?;
            }
            Step::RemountRo { target } => {
                let t = at(target);
                let fl = libc::MS_REMOUNT | libc::MS_RDONLY | nosuid | kept_flags(&t);
                mount(None, &t, None, fl, None)?;
            }
        }
    }
    Ok(())
}

/// `pivot_root` into `root`, detach the old root, and make `/` read-only.
pub fn pivot(root: &str) -> io::Result<()> {
    let r = cstr(root.as_bytes())?;
    let dot = cstr(b".")?;
    // SAFETY: valid C strings; we are alone in a private mount namespace.
    unsafe {
        cvt(libc::chdir(r.as_ptr()))?;
        cvt(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as i32)
            .map_err(|e| io::Error::new(e.kind(), format!("pivot_root: {e}")))?;
        cvt(libc::umount2(dot.as_ptr(), libc::MNT_DETACH))?;
        cvt(libc::chdir(c"/".as_ptr()))?;
    }
    let fl = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    mount(None, "/", None, fl, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> PlanInput<'static> {
        PlanInput {
            image: "",
            image_entries: vec![
                ("usr", Entry::Dir),
                ("bin", Entry::Symlink("usr/bin".into())),
                ("lib32", Entry::Missing),
            ],
            etc_entries: vec![("ld.so.cache", Entry::File), ("alternatives", Entry::Dir)],
            disk_bytes: 1 << 20,
            shm_bytes: 1 << 20,
        }
    }

    #[test]
    fn image_is_bound_read_only_and_symlinks_are_kept() {
        let p = plan(&input());
        assert!(p.contains(&Step::BindRo {
            src: "/usr".into(),
            target: "/usr".into(),
            dir: true
        }));
        assert!(p.contains(&Step::Symlink {
            target: "/bin".into(),
            to: "usr/bin".into()
        }));
        assert!(!p
            .iter()
            .any(|s| matches!(s, Step::BindRo { target, .. } if target == "/lib32")));
        assert!(p.contains(&Step::BindRo {
            src: "/etc/ld.so.cache".into(),
            target: "/etc/ld.so.cache".into(),
            dir: false
        }));
    }

    #[test]
    fn writable_mounts_are_size_limited_tmpfs() {
        let p = plan(&input());
        for t in ["/workspace", "/tmp", "/dev/shm"] {
            assert!(
                p.iter().any(|s| matches!(s, Step::Tmpfs { target, size, .. } if target == t && *size == 1 << 20)),
                "{t}"
            );
        }
    }

    #[test]
    fn dev_is_minimal_and_proc_is_masked_after_dev() {
        let p = plan(&input());
        let devs: Vec<_> = p
            .iter()
            .filter_map(|s| match s {
                Step::BindDev { target, .. } => Some(target.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            devs,
            [
                "/dev/null",
                "/dev/zero",
                "/dev/full",
                "/dev/random",
                "/dev/urandom",
                "/dev/tty"
            ]
        );
        let pos = |want: &Step| p.iter().position(|s| s == want).unwrap();
        let null = pos(&Step::BindDev {
            src: "/dev/null".into(),
            target: "/dev/null".into(),
        });
        let kcore = pos(&Step::Mask {
            target: "/proc/kcore".into(),
        });
        let proc_ = pos(&Step::Proc {
            target: "/proc".into(),
        });
        assert!(null < proc_ && proc_ < kcore);
        assert!(p.contains(&Step::RoSelf {
            target: "/proc/sys".into()
        }));
        assert!(p.contains(&Step::RoSelf {
            target: "/proc/sysrq-trigger".into()
        }));
        assert!(p.contains(&Step::RemountRo {
            target: "/etc".into()
        }));
        assert!(!p
            .iter()
            .any(|s| matches!(s, Step::BindRo { target, .. } if target == "/sys")));
    }
}

//! Host-side cgroup management: one cgroup per sandbox, created under the caller's own cgroup.
//! cgroup v1 (memory + pids hierarchies, as on hosts with a hybrid layout) is used when its
//! controllers are mounted; otherwise a cgroup v2 hierarchy where the caller's cgroup can
//! delegate memory and pids. Detected once at runtime, never assumed.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Which cgroup interface a host offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// v1: the caller's cgroup directories in the memory and pids hierarchies, and in the
    /// cpu and cpuacct hierarchies where they are mounted (the same directory when they share
    /// one).
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
        cpuacct: Option<PathBuf>,
    },
    /// v2: the caller's cgroup directory (controllers enabled in its subtree_control) and the
    /// leaf a sandbox's outer init moves back to before removing the sandbox's cgroup.
    V2 { base: PathBuf, leave: PathBuf },
}

/// Result of detection: the layout, or why none is usable.
pub type Detected = std::result::Result<Layout, String>;

struct Mount {
    root: String,
    point: String,
    fstype: String,
    opts: String,
}

fn mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: f.get(3)?.to_string(),
                point: f.get(4)?.to_string(),
                fstype: r.first()?.to_string(),
                opts: r.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// Parses /proc/self/cgroup into (controllers, path) pairs.
pub fn parse_proc_cgroup(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

fn join(m: &Mount, path: &str) -> PathBuf {
    let rel = path
        .strip_prefix(m.root.as_str())
        .unwrap_or(path)
        .trim_start_matches('/');
    Path::new(&m.point).join(rel)
}

/// Detects the layout (uncached).
pub fn detect_uncached() -> Detected {
    let ms = mounts();
    let own = parse_proc_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
    let v1 = |ctl: &str| -> Option<PathBuf> {
        let m = ms
            .iter()
            .find(|m| m.fstype == "cgroup" && m.opts.split(',').any(|o| o == ctl))?;
        let (_, p) = own.iter().find(|(c, _)| c.split(',').any(|x| x == ctl))?;
        Some(join(m, p))
    };
    if let (Some(memory), Some(pids)) = (v1("memory"), v1("pids")) {
        if memory.join("cgroup.procs").exists() && pids.join("cgroup.procs").exists() {
            let usable = |p: Option<PathBuf>| p.filter(|p| p.join("cgroup.procs").exists());
            return Ok(Layout::V1 {
                memory,
                pids,
                cpu: usable(v1("cpu")),
                cpuacct: usable(v1("cpuacct")),
            });
        }
    }
    let Some(m2) = ms.iter().find(|m| m.fstype == "cgroup2") else {
        return Err("no cgroup v1 memory+pids controllers and no cgroup2 mount".into());
    };
    let Some((_, p)) = own.iter().find(|(c, _)| c.is_empty()) else {
        return Err("cgroup2 is mounted but this process has no cgroup2 path".into());
    };
    let base = join(m2, p);
    let is_root = p == "/";
    let host_leaf = base.join("dsec-host");
    let leave = if is_root {
        base.clone()
    } else {
        host_leaf.clone()
    };
    let enabled = |b: &Path| {
        let ctl = std::fs::read_to_string(b.join("cgroup.subtree_control")).unwrap_or_default();
        ctl.split_whitespace().any(|x| x == "memory") && ctl.split_whitespace().any(|x| x == "pids")
    };
    if enabled(&base) {
        // cpu is optional: enabled when the parent offers it (best effort).
        let _ = std::fs::write(base.join("cgroup.subtree_control"), "+cpu");
        return Ok(Layout::V2 { base, leave });
    }
    if std::fs::write(base.join("cgroup.subtree_control"), "+memory +pids").is_err() && !is_root {
        // "No internal processes": move the processes of our cgroup into a leaf, then enable.
        let _ = std::fs::create_dir(&host_leaf);
        let procs = std::fs::read_to_string(base.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(host_leaf.join("cgroup.procs"), pid);
        }
        let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory +pids");
    }
    if enabled(&base) {
        let _ = std::fs::write(base.join("cgroup.subtree_control"), "+cpu");
        return Ok(Layout::V2 { base, leave });
    }
    Err(format!(
        "cgroup2 at {} does not delegate memory and pids (enable them in its cgroup.subtree_control, \
         e.g. run under a systemd unit with Delegate=yes)",
        base.display()
    ))
}

/// Detects the layout once per process.
pub fn detect() -> &'static Detected {
    static D: OnceLock<Detected> = OnceLock::new();
    D.get_or_init(detect_uncached)
}

/// The cgroup(s) of one sandbox.
#[derive(Debug)]
pub struct SandboxCgroup {
    layout: Layout,
    /// (directory, cgroup the outer init moves back to before removing it) per hierarchy.
    pub dirs: Vec<(PathBuf, PathBuf)>,
    /// The OOM-event and peak-usage files, opened once (read around every call).
    oom_file: Option<std::fs::File>,
    peak_file: Option<std::fs::File>,
    /// The CPU-usage file (v1 cpuacct.usage in ns, v2 cpu.stat), where there is one.
    cpu_file: Option<std::fs::File>,
    /// Whether the CPU bandwidth limit is in force.
    pub cpu_limited: bool,
}

/// What a sandbox's cgroup enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub memory_bytes: u64,
    pub max_pids: u64,
    /// CPU bandwidth in CPUs (`None`: unlimited).
    pub cpus: Option<f64>,
    /// TCP socket buffer memory (cgroup v1 kmem.tcp; v2 charges sockets to memory.max).
    pub tcp_bytes: u64,
}

/// Period of the CPU bandwidth limit, microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Whether this host can bound CPU per sandbox and account it (the v1 cpu controller or v2
/// cpu in the caller's subtree).
pub fn cpu_controller() -> bool {
    match detect() {
        Ok(Layout::V1 { cpu, cpuacct, .. }) => cpu.is_some() && cpuacct.is_some(),
        Ok(Layout::V2 { base, .. }) => std::fs::read_to_string(base.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu")),
        Err(_) => false,
    }
}

/// Reclaims what is still charged to an emptied sandbox cgroup (page cache, dentries and
/// inodes it created on host filesystems) before it is removed; otherwise the kernel moves
/// those charges to the parent, the caller's cgroup. Best effort; a no-op for other
/// controllers' directories.
pub fn release_memory(dir: &Path) {
    if dir.join("memory.force_empty").exists() {
        let _ = std::fs::write(dir.join("memory.force_empty"), "0");
    } else if dir.join("memory.reclaim").exists() {
        let _ = std::fs::write(dir.join("memory.reclaim"), "1T");
    }
}

/// Reads a whole (small) control file from offset 0 of an open descriptor.
fn pread_text(f: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 1024];
    let n = f.read_at(&mut buf, 0).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn write(dir: &Path, file: &str, val: &str) -> Result<()> {
    std::fs::write(dir.join(file), val)
        .map_err(|e| Error::Setup(format!("write {}: {e}", dir.join(file).display())))
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

fn field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

/// Removes the sandbox cgroups of processes that died between creating them and handing them to
/// an outer init (a SIGKILL in those few milliseconds leaves them behind; an outer init removes
/// the ones it was given): `dsec-<pid>-<n>` directories whose creator is gone. rmdir fails on a
/// cgroup that still holds a task, so a live sandbox is never touched.
fn sweep_stale(parents: &[PathBuf]) {
    let me = std::process::id();
    for p in parents {
        let Ok(entries) = std::fs::read_dir(p) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("dsec-"))
                .and_then(|r| r.split('-').next())
                .and_then(|x| x.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
                    release_memory(&e.path());
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

impl SandboxCgroup {
    /// Creates the cgroup(s) with the memory, pids, TCP buffer and CPU bandwidth limits.
    /// A process's first call also removes cgroups that dead processes left (`sweep_stale`).
    pub fn create(lim: &Limits) -> Result<Self> {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let layout = detect().clone().map_err(Error::Setup)?;
        let name = format!(
            "dsec-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let parents: Vec<PathBuf> = match &layout {
            Layout::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            } => {
                let mut v = vec![memory.clone(), pids.clone()];
                for p in [cpu, cpuacct].into_iter().flatten() {
                    if !v.contains(p) {
                        v.push(p.clone());
                    }
                }
                v
            }
            Layout::V2 { base, .. } => vec![base.clone()],
        };
        SWEEP.call_once(|| sweep_stale(&parents));
        let mut cg = SandboxCgroup {
            layout,
            dirs: Vec::new(),
            oom_file: None,
            peak_file: None,
            cpu_file: None,
            cpu_limited: false,
        };
        for p in parents {
            let d = p.join(&name);
            std::fs::create_dir(&d)
                .map_err(|e| Error::Setup(format!("mkdir {}: {e}", d.display())))?;
            let leave = match &cg.layout {
                Layout::V2 { leave, .. } => leave.clone(),
                Layout::V1 { .. } => p,
            };
            cg.dirs.push((d, leave));
        }
        let mem = lim.memory_bytes.to_string();
        let pids = lim.max_pids.to_string();
        let quota = lim
            .cpus
            .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1000));
        let dir_of = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.join(&name))
                .filter(|d| cg.dirs.iter().any(|(x, _)| x == d))
        };
        let (cpu_dir, acct_dir) = match &cg.layout {
            Layout::V1 { cpu, cpuacct, .. } => (dir_of(cpu), dir_of(cpuacct)),
            Layout::V2 { .. } => (None, None),
        };
        match &cg.layout {
            Layout::V1 { .. } => {
                let m = &cg.dirs[0].0;
                write(m, "memory.limit_in_bytes", &mem)?;
                if m.join("memory.memsw.limit_in_bytes").exists() {
                    write(m, "memory.memsw.limit_in_bytes", &mem)?;
                }
                // Socket buffers are kernel memory v1 charges only once a TCP limit is set.
                if m.join("memory.kmem.tcp.limit_in_bytes").exists() {
                    write(
                        m,
                        "memory.kmem.tcp.limit_in_bytes",
                        &lim.tcp_bytes.to_string(),
                    )?;
                }
                write(&cg.dirs[1].0, "pids.max", &pids)?;
                if let (Some(d), Some(q)) = (&cpu_dir, quota) {
                    write(d, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    write(d, "cpu.cfs_quota_us", &q.to_string())?;
                    cg.cpu_limited = true;
                }
                if let Some(d) = &acct_dir {
                    cg.cpu_file = std::fs::File::open(d.join("cpuacct.usage")).ok();
                }
            }
            Layout::V2 { .. } => {
                let d = &cg.dirs[0].0;
                write(d, "memory.max", &mem)?;
                write(d, "memory.swap.max", "0").ok();
                write(d, "pids.max", &pids)?;
                if d.join("cpu.max").exists() {
                    if let Some(q) = quota {
                        write(d, "cpu.max", &format!("{q} {CPU_PERIOD_US}"))?;
                        cg.cpu_limited = true;
                    }
                }
                cg.cpu_file = std::fs::File::open(d.join("cpu.stat")).ok();
            }
        }
        let (oom, peak) = cg.files();
        cg.oom_file = std::fs::File::open(cg.memdir().join(oom)).ok();
        cg.peak_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(cg.memdir().join(peak))
            .ok();
        Ok(cg)
    }

    /// Names of the OOM-event and peak-usage files of this layout.
    fn files(&self) -> (&'static str, &'static str) {
        match self.layout {
            Layout::V1 { .. } => ("memory.oom_control", "memory.max_usage_in_bytes"),
            Layout::V2 { .. } => ("memory.events", "memory.peak"),
        }
    }

    fn memdir(&self) -> &Path {
        &self.dirs[0].0
    }

    /// CPU time used by every task of the sandbox so far, seconds (`None` without a CPU
    /// accounting controller).
    pub fn cpu_usage(&self) -> Option<f64> {
        let text = pread_text(self.cpu_file.as_ref()?)?;
        match self.layout {
            Layout::V1 { .. } => text.trim().parse::<u64>().ok().map(|ns| ns as f64 * 1e-9),
            Layout::V2 { .. } => field(&text, "usage_usec ").map(|us| us as f64 * 1e-6),
        }
    }

    /// The OOM-kill counter of the sandbox.
    pub fn oom_kills(&self) -> u64 {
        let text = match &self.oom_file {
            Some(f) => pread_text(f),
            None => read(self.memdir(), self.files().0),
        };
        text.and_then(|t| field(&t, "oom_kill ")).unwrap_or(0)
    }

    /// Resets the peak-memory watermark (best effort).
    pub fn reset_peak(&self) {
        use std::os::unix::fs::FileExt;
        match &self.peak_file {
            Some(f) => {
                let _ = f.write_at(b"0", 0);
            }
            None => {
                let _ = std::fs::write(self.memdir().join(self.files().1), "0");
            }
        }
    }

    /// Peak memory since the last reset, bytes.
    pub fn peak(&self) -> u64 {
        let text = match &self.peak_file {
            Some(f) => pread_text(f),
            None => read(self.memdir(), self.files().1),
        };
        text.and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    }

    /// SIGKILLs every task in the sandbox's cgroup(s) (cgroup.kill where the kernel has it),
    /// repeating while new tasks appear (a fork racing the kill), a bounded number of times.
    pub fn kill(&self) {
        for (d, _) in &self.dirs {
            if std::fs::write(d.join("cgroup.kill"), "1").is_ok() {
                continue;
            }
            for _ in 0..50 {
                let procs = read(d, "cgroup.procs").unwrap_or_default();
                let pids: Vec<i32> = procs
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect();
                if pids.is_empty() {
                    break;
                }
                for p in pids {
                    // SAFETY: kill(2) on a task of the sandbox's cgroup.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }

    /// Removes the directories (retrying while the kernel finishes tearing tasks down).
    pub fn remove(&self) {
        for (d, _) in &self.dirs {
            release_memory(d);
            for _ in 0..100 {
                match std::fs::remove_dir(d) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        std::thread::sleep(std::time::Duration::from_millis(2))
                    }
                    _ => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_cgroup() {
        let v = parse_proc_cgroup("4:memory:/a/b\n8:pids:/\n0::/x\n");
        assert_eq!(v[0], ("memory".into(), "/a/b".into()));
        assert_eq!(v[2], (String::new(), "/x".into()));
    }

    #[test]
    fn joins_paths_relative_to_the_mount_root() {
        let m = Mount {
            root: "/a".into(),
            point: "/sys/fs/cgroup/memory".into(),
            fstype: "cgroup".into(),
            opts: String::new(),
        };
        assert_eq!(join(&m, "/a/b"), PathBuf::from("/sys/fs/cgroup/memory/b"));
        assert_eq!(
            field("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill "),
            Some(3)
        );
    }
}

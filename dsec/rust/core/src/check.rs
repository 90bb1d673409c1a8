//! Preflight probe: which isolation features this kernel offers, and whether the default policy
//! is actually enforced (verified by running a probe inside a real sandbox).

use crate::host::{ExecRequest, InitImage, Sandbox};
use crate::policy::Policy;

/// The probe's findings.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// (namespace, available) for user, pid, mount, net, ipc, uts, cgroup.
    pub namespaces: Vec<(&'static str, bool)>,
    pub seccomp: bool,
    pub landlock_abi: u32,
    pub landlock_enforced: bool,
    /// "v1", "v2" or None.
    pub cgroup: Option<String>,
    /// (controller, usable).
    pub controllers: Vec<(&'static str, bool)>,
    /// Posture of a process inside a default sandbox: CapEff, NoNewPrivs, Seccomp lines.
    pub posture: Vec<(String, String)>,
    pub enforced: bool,
    pub problems: Vec<String>,
    /// Protections that depend on the host, (name, in force): see [`hardening`].
    pub hardening: Vec<(&'static str, bool)>,
    /// What is weaker on this host than it could be (not a reason to refuse to run).
    pub warnings: Vec<String>,
}

fn has_cap(bit: u32) -> bool {
    read("/proc/self/status")
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// The host-dependent protections and a warning for each one missing:
/// - `cpu_bandwidth`: a cgroup cpu controller (v1 cpu+cpuacct, v2 cpu delegated) for the
///   `cpus` limit, the whole-call `cpu_seconds` budget and the whole call's `cpu_time`;
/// - `tcp_memory`: socket buffers bounded per sandbox (v1 `memory.kmem.tcp.limit_in_bytes`;
///   v2 charges them to `memory.max`);
/// - `memory_release`: what a closed sandbox leaves charged (dentries, page cache) reclaimed
///   before its cgroup is removed (v1 `memory.force_empty`, v2 `memory.reclaim`);
/// - `init_oom_protected`: the init at oom_score_adj -1000 (needs CAP_SYS_RESOURCE); without
///   it the init relies on the memory headroom and the workload's oom_score_adj 1000.
pub fn hardening() -> (Vec<(&'static str, bool)>, Vec<String>) {
    let mem_file = |f: &str| match crate::cgroup::detect() {
        Ok(crate::cgroup::Layout::V1 { memory, .. }) => memory.join(f).exists(),
        _ => false,
    };
    let v2 = matches!(
        crate::cgroup::detect(),
        Ok(crate::cgroup::Layout::V2 { .. })
    );
    let v2_file = |f: &str| match crate::cgroup::detect() {
        Ok(crate::cgroup::Layout::V2 { base, .. }) => base.join(f).exists() || v2,
        _ => false,
    };
    let items = [
        (
            "cpu_bandwidth",
            crate::cgroup::cpu_controller(),
            "no cgroup cpu controller for sandboxes: `cpus` is not enforced, `cpu_seconds` \
             bounds each process only (RLIMIT_CPU) and cpu_time counts reaped processes only \
             (mount the v1 cpu and cpuacct controllers or delegate v2 cpu)",
        ),
        (
            "tcp_memory",
            v2 || mem_file("memory.kmem.tcp.limit_in_bytes"),
            "socket buffers are not bounded per sandbox (cgroup v1 without kmem.tcp)",
        ),
        (
            "memory_release",
            mem_file("memory.force_empty") || v2_file("memory.reclaim"),
            "kernel memory a sandbox leaves behind stays charged to the caller's cgroup",
        ),
        (
            "init_oom_protected",
            has_cap(24),
            "no CAP_SYS_RESOURCE: the sandbox init cannot be set to oom_score_adj -1000; it \
             is protected by the memory headroom and the workload's oom_score_adj 1000 only",
        ),
    ];
    let warnings = items
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(_, _, w)| w.to_string())
        .collect();
    (items.iter().map(|(n, ok, _)| (*n, *ok)).collect(), warnings)
}

fn read(p: &str) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// Runs the probe (creates and closes one sandbox).
pub fn probe(image: &InitImage) -> Report {
    let mut r = Report::default();
    (r.hardening, r.warnings) = hardening();
    for (name, file) in [
        ("user_ns", "user"),
        ("pid_ns", "pid"),
        ("mount_ns", "mnt"),
        ("net_ns", "net"),
        ("ipc_ns", "ipc"),
        ("uts_ns", "uts"),
        ("cgroup_ns", "cgroup"),
    ] {
        r.namespaces.push((
            name,
            std::path::Path::new(&format!("/proc/self/ns/{file}")).exists(),
        ));
    }
    if let Some(n) = read("/proc/sys/user/max_user_namespaces") {
        if n.trim() == "0" {
            r.problems.push(
                "user namespaces are disabled: set sysctl user.max_user_namespaces > 0".into(),
            );
        }
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").is_some_and(|v| v.trim() == "1")
        // SAFETY: geteuid has no preconditions.
        && unsafe { libc::geteuid() } != 0
    {
        r.problems.push(
            "AppArmor restricts unprivileged user namespaces: set sysctl \
             kernel.apparmor_restrict_unprivileged_userns=0 or run as root"
                .into(),
        );
    }
    r.seccomp = read("/proc/self/status").is_some_and(|s| s.contains("\nSeccomp:"));
    if !r.seccomp {
        r.problems
            .push("seccomp is not available: build the kernel with CONFIG_SECCOMP_FILTER=y".into());
    }
    r.landlock_abi = crate::landlock::abi_version();
    if r.landlock_abi == 0 {
        r.problems.push("landlock is not enabled: add landlock to the lsm= kernel parameter (CONFIG_SECURITY_LANDLOCK=y)".into());
    }
    match crate::cgroup::detect() {
        Ok(crate::cgroup::Layout::V1 { .. }) => {
            r.cgroup = Some("v1".into());
            r.controllers = vec![("memory", true), ("pids", true)];
        }
        Ok(crate::cgroup::Layout::V2 { .. }) => {
            r.cgroup = Some("v2".into());
            r.controllers = vec![("memory", true), ("pids", true)];
        }
        Err(m) => {
            r.controllers = vec![("memory", false), ("pids", false)];
            r.problems.push(m.clone());
        }
    }
    let sb = match Sandbox::new(Policy::default(), image) {
        Ok(s) => s,
        Err(e) => {
            let msg = e.to_string();
            let hint = if msg.contains("mount") && msg.contains("proc") {
                " (a fresh /proc cannot be mounted while the host's /proc has masked entries, as \
                 in default Docker containers: run with --security-opt systempaths=unconfined)"
            } else if msg.contains("clone") {
                " (new namespaces are refused: check user.max_user_namespaces and the seccomp or \
                 AppArmor profile of the container)"
            } else {
                ""
            };
            r.problems
                .push(format!("cannot create a default sandbox: {msg}{hint}"));
            return r;
        }
    };
    let req = ExecRequest {
        argv: vec![b"/bin/cat".to_vec(), b"/proc/self/status".to_vec()],
        ..Default::default()
    };
    match sb.exec(&req) {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            for key in ["CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp"] {
                let v = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix(&format!("{key}:"))
                            .map(|v| v.trim().to_string())
                    })
                    .unwrap_or_default();
                r.posture.push((key.to_string(), v));
            }
            let get = |k: &str| {
                r.posture
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.as_str())
                    .unwrap_or("")
            };
            let caps_zero = ["CapEff", "CapPrm", "CapBnd"]
                .iter()
                .all(|k| get(k).trim_start_matches('0').is_empty() && !get(k).is_empty());
            if !caps_zero {
                r.problems
                    .push("a sandboxed process still holds capabilities".into());
            }
            if get("NoNewPrivs") != "1" {
                r.problems
                    .push("no_new_privs is not set in the sandbox".into());
            }
            if get("Seccomp") != "2" {
                r.problems
                    .push("the seccomp filter is not active in the sandbox".into());
            }
        }
        Err(e) => r.problems.push(format!("probe exec failed: {e}")),
    }
    sb.close();
    r.landlock_enforced = r.landlock_abi > 0;
    r.enforced = r.problems.is_empty() && r.namespaces.iter().all(|(_, ok)| *ok);
    r
}

//! The in-sandbox init (runs as the `dsec-init` binary, started by the host from a sealed memfd).
//!
//! Process structure: the host spawns the binary once per host process (the *launcher*), which
//! forks the *outer* part per sandbox (still in the host's namespaces); the outer part joins
//! the sandbox cgroup and clones the *inner* part into new user, pid, mount, net, ipc, uts and
//! cgroup namespaces, writes its uid/gid maps, then waits for it and removes the cgroup. The inner part is pid 1 of the sandbox: it builds the root, pivots into
//! it and serves requests from the host over the control socket until end of stream.

pub mod confine;
pub mod exec;
pub mod files;
mod inner;
mod launcher;
mod outer;
pub mod procs;
pub mod pump;
pub mod pyserver;
pub mod reset;
pub mod warm;

/// Entry point of the init binary; fd 0 is the launcher socket (see `launcher`), which forks
/// one outer init per sandbox.
pub fn main() -> i32 {
    launcher::run()
}

/// Encodes the config frame the host sends to a fresh init.
pub fn outer_config(
    policy: &crate::Policy,
    cgroups: &[(std::path::PathBuf, std::path::PathBuf)],
) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let b = |p: &std::path::PathBuf| p.as_os_str().as_bytes().to_vec();
    outer::Config {
        policy: policy.clone(),
        cgroups: cgroups.iter().map(|(d, p)| (b(d), b(p))).collect(),
    }
    .encode()
}

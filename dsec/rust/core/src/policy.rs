//! The sandbox policy: plain data with conservative defaults and one validation function.

use crate::wire::{Dec, Enc};
use crate::{Error, Result};
use std::io;

const MIB: u64 = 1 << 20;

/// Everything a sandbox enforces. Field names are the Python keyword names.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Memory limit of the whole sandbox (cgroup), bytes; tmpfs pages count against it.
    pub memory_bytes: u64,
    /// Maximum number of tasks in the sandbox (cgroup pids.max and RLIMIT_NPROC).
    pub max_pids: u64,
    /// CPU seconds one call may use, all its processes together (the host kills the call
    /// when the sandbox's cgroup has used them; RLIMIT_CPU bounds each process too);
    /// `None` = unlimited.
    pub cpu_seconds: Option<u64>,
    /// CPU bandwidth of the whole sandbox in CPUs (cgroup cpu.max / cfs quota); `None` =
    /// unlimited.
    pub cpus: Option<f64>,
    /// Default wall-clock timeout of an exec / run_python call, seconds.
    pub timeout: f64,
    /// Bytes kept per stream (stdout, stderr): head and tail halves.
    pub max_output_bytes: u64,
    /// Size of the /workspace and /tmp tmpfs mounts each, and RLIMIT_FSIZE.
    pub disk_bytes: u64,
    /// RLIMIT_NOFILE of sandboxed processes.
    pub max_open_files: u64,
    /// Share the host network namespace (`false`: a private netns with loopback only).
    pub network: bool,
    /// A directory used instead of `/` as the source of the read-only image (usr, bin, lib*, etc).
    pub image: Option<Vec<u8>>,
    /// Extra environment variables of every sandboxed process (`KEY=VALUE`).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Refuse to start when landlock is not enforced by the kernel.
    pub require_landlock: bool,
    /// Host uid/gid the sandbox's uid/gid 0 maps to (never 0). Chosen by the host when the
    /// sandbox starts: a uid of `uid_range` no other live sandbox on this machine holds.
    pub host_id: u32,
    /// Host uids sandboxes may map to, `(first, count)`, like a subordinate uid range. Each
    /// live sandbox holds one of its own, so per-user kernel budgets (pipe buffers, file
    /// descriptors in flight, inotify, queued signals) are not shared between sandboxes.
    pub uid_range: (u32, u32),
    /// Host directory of a snapshot tree (`crate::snapshot`): the read-only lower layer of
    /// /workspace, whose writes go to a tmpfs of `disk_bytes`. `None`: an empty /workspace.
    pub snapshot: Option<Vec<u8>>,
}

/// Default [`Policy::uid_range`].
pub const UID_RANGE: (u32, u32) = (1_800_000_000, 1 << 16);

impl Default for Policy {
    fn default() -> Self {
        Policy {
            memory_bytes: 512 * MIB,
            max_pids: 256,
            cpu_seconds: None,
            cpus: Some(1.0),
            timeout: 30.0,
            max_output_bytes: MIB,
            disk_bytes: 256 * MIB,
            max_open_files: 1024,
            network: false,
            image: None,
            env: Vec::new(),
            require_landlock: true,
            host_id: 65534,
            uid_range: UID_RANGE,
            snapshot: None,
        }
    }
}

fn range(name: &str, v: u64, lo: u64, hi: u64) -> Result<()> {
    if v < lo || v > hi {
        return Err(Error::Policy(format!(
            "{name} must be between {lo} and {hi}, got {v}"
        )));
    }
    Ok(())
}

/// Checks a wall-clock timeout in seconds (finite, > 0, at most a day).
pub fn check_timeout(name: &str, t: f64) -> Result<()> {
    if !t.is_finite() || t <= 0.0 || t > 86_400.0 {
        return Err(Error::Policy(format!(
            "{name} must be a number of seconds in (0, 86400], got {t}"
        )));
    }
    Ok(())
}

/// Checks one environment entry: a non-empty name without `=` or NUL, a value without NUL.
pub fn check_env(arg: &str, k: &[u8], v: &[u8]) -> Result<()> {
    let ks = String::from_utf8_lossy(k);
    if k.is_empty() || k.contains(&b'=') || k.contains(&0) {
        return Err(Error::Policy(format!(
            "{arg}: invalid variable name {ks:?}"
        )));
    }
    if v.contains(&0) {
        return Err(Error::Policy(format!(
            "{arg}: value of {ks} contains a NUL byte"
        )));
    }
    Ok(())
}

/// Memory a sandbox's tmpfs mounts may pin, derived from the policy (see
/// [`Policy::memory_budget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Size of /workspace and of /tmp, each.
    pub tmpfs_bytes: u64,
    /// Size of /dev/shm, and the SysV shared memory of the sandbox's ipc namespace.
    pub shm_bytes: u64,
    /// Memory kept free for the init and the calls' working memory.
    pub headroom: u64,
}

impl Policy {
    /// Files and shared memory outlive the call that made them and cannot be reclaimed by the
    /// OOM killer, so together they must fit inside `memory_bytes` with room left for the
    /// init: headroom is an eighth of `memory_bytes` (at least 8 MiB) plus four times
    /// `max_output_bytes` (the init's capture of both streams and the result frame); of the rest /workspace and /tmp get 3/8 each and
    /// /dev/shm and SysV shared memory 1/8 each, none more than `disk_bytes`.
    pub fn memory_budget(&self) -> MemoryBudget {
        let m = self.memory_bytes;
        let headroom = (m / 8).max(8 * MIB) + 4 * self.max_output_bytes;
        let rest = m.saturating_sub(headroom);
        let clamp = |v: u64| (v.min(self.disk_bytes) & !4095).max(MIB);
        MemoryBudget {
            tmpfs_bytes: clamp(rest / 8 * 3),
            shm_bytes: clamp(rest / 8),
            headroom,
        }
    }

    /// TCP socket buffers the sandbox may hold (cgroup v1 kmem.tcp limit): a quarter of
    /// `memory_bytes`, at least 4 MiB. On cgroup v2 they count against `memory_bytes`.
    pub fn tcp_bytes(&self) -> u64 {
        (self.memory_bytes / 4).max(4 * MIB)
    }

    /// Validates every field; the error names the field and the bad value.
    pub fn validate(&self) -> Result<()> {
        range("memory_bytes", self.memory_bytes, 16 * MIB, 1 << 40)?;
        range("max_pids", self.max_pids, 8, 1 << 22)?;
        if let Some(c) = self.cpu_seconds {
            range("cpu_seconds", c, 1, 1 << 32)?;
        }
        if let Some(c) = self.cpus {
            if !c.is_finite() || !(0.01..=1024.0).contains(&c) {
                return Err(Error::Policy(format!(
                    "cpus must be a number of CPUs in [0.01, 1024], got {c}"
                )));
            }
        }
        check_timeout("timeout", self.timeout)?;
        range("max_output_bytes", self.max_output_bytes, 1, 256 * MIB)?;
        range("disk_bytes", self.disk_bytes, MIB, 1 << 40)?;
        range("max_open_files", self.max_open_files, 16, 1 << 20)?;
        let (first, count) = self.uid_range;
        if first == 0 || count == 0 || u64::from(first) + u64::from(count) > u64::from(u32::MAX) {
            return Err(Error::Policy(format!(
                "uid_range must be (first, count) with first > 0, count > 0 and first + count \
                 below 2**32 - 1, got ({first}, {count})"
            )));
        }
        if self.host_id == 0 {
            return Err(Error::Policy("host_id must not be 0 (host root)".into()));
        }
        if let Some(s) = &self.snapshot {
            if s.first() != Some(&b'/') || s.contains(&0) {
                return Err(Error::Policy(format!(
                    "snapshot must be an absolute directory path, got {:?}",
                    String::from_utf8_lossy(s)
                )));
            }
        }
        if let Some(img) = &self.image {
            if img.first() != Some(&b'/') || img.contains(&0) {
                return Err(Error::Policy(format!(
                    "image must be an absolute directory path, got {:?}",
                    String::from_utf8_lossy(img)
                )));
            }
        }
        for (k, v) in &self.env {
            check_env("env", k, v)?;
        }
        Ok(())
    }

    /// The environment of a sandboxed process: defaults, then the policy's, then `extra`.
    pub fn environment(&self, extra: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
        let mut vars: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (
                b"PATH".to_vec(),
                b"/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_vec(),
            ),
            (b"HOME".to_vec(), b"/workspace".to_vec()),
            (b"LANG".to_vec(), b"C.UTF-8".to_vec()),
            (b"TMPDIR".to_vec(), b"/tmp".to_vec()),
        ];
        for (k, v) in self.env.iter().chain(extra) {
            match vars.iter_mut().find(|(n, _)| n == k) {
                Some(slot) => slot.1 = v.clone(),
                None => vars.push((k.clone(), v.clone())),
            }
        }
        vars.into_iter()
            .map(|(k, v)| {
                let mut e = k;
                e.push(b'=');
                e.extend_from_slice(&v);
                e
            })
            .collect()
    }

    /// Encodes the fields the init needs.
    pub fn encode(&self, e: &mut Enc) {
        e.u64(self.memory_bytes)
            .u64(self.max_pids)
            .u64(self.cpu_seconds.unwrap_or(0));
        e.u64((self.timeout * 1e3) as u64)
            .u64(self.max_output_bytes)
            .u64(self.disk_bytes);
        e.u64(self.max_open_files)
            .u8(self.network as u8)
            .opt_bytes(self.image.as_deref());
        e.u32(self.env.len() as u32);
        for (k, v) in &self.env {
            e.bytes(k).bytes(v);
        }
        e.u8(self.require_landlock as u8).u32(self.host_id);
        e.u64(self.cpus.map_or(0, f64::to_bits));
        e.u32(self.uid_range.0).u32(self.uid_range.1);
        e.opt_bytes(self.snapshot.as_deref());
    }

    /// Decodes what [`Policy::encode`] wrote.
    pub fn decode(d: &mut Dec<'_>) -> io::Result<Self> {
        let memory_bytes = d.u64()?;
        let max_pids = d.u64()?;
        let cpu = d.u64()?;
        let timeout = d.u64()? as f64 / 1e3;
        let max_output_bytes = d.u64()?;
        let disk_bytes = d.u64()?;
        let max_open_files = d.u64()?;
        let network = d.u8()? != 0;
        let image = d.opt_bytes()?;
        let n = d.u32()?;
        let mut env = Vec::new();
        for _ in 0..n {
            env.push((d.bytes()?, d.bytes()?));
        }
        Ok(Policy {
            memory_bytes,
            max_pids,
            cpu_seconds: (cpu > 0).then_some(cpu),
            timeout,
            max_output_bytes,
            disk_bytes,
            max_open_files,
            network,
            image,
            env,
            require_landlock: d.u8()? != 0,
            host_id: d.u32()?,
            cpus: Some(f64::from_bits(d.u64()?)).filter(|c| *c > 0.0),
            uid_range: (d.u32()?, d.u32()?),
            snapshot: d.opt_bytes()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_roundtrip() {
        let mut p = Policy::default();
        p.validate().unwrap();
        p.cpu_seconds = Some(3);
        p.env = vec![(b"A".to_vec(), b"1".to_vec())];
        p.image = Some(b"/srv/img".to_vec());
        p.snapshot = Some(b"/srv/snap/tree".to_vec());
        let mut e = Enc::default();
        p.encode(&mut e);
        assert_eq!(Policy::decode(&mut Dec::new(&e.0)).unwrap(), p);
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases: Vec<(Policy, &str)> = vec![
            (
                Policy {
                    memory_bytes: 0,
                    ..Default::default()
                },
                "memory_bytes",
            ),
            (
                Policy {
                    max_pids: 1,
                    ..Default::default()
                },
                "max_pids",
            ),
            (
                Policy {
                    cpu_seconds: Some(0),
                    ..Default::default()
                },
                "cpu_seconds",
            ),
            (
                Policy {
                    timeout: f64::NAN,
                    ..Default::default()
                },
                "timeout",
            ),
            (
                Policy {
                    timeout: -1.0,
                    ..Default::default()
                },
                "timeout",
            ),
            (
                Policy {
                    disk_bytes: 5,
                    ..Default::default()
                },
                "disk_bytes",
            ),
            (
                Policy {
                    max_open_files: 1 << 30,
                    ..Default::default()
                },
                "max_open_files",
            ),
            (
                Policy {
                    host_id: 0,
                    ..Default::default()
                },
                "host_id",
            ),
            (
                Policy {
                    image: Some(b"rel".to_vec()),
                    ..Default::default()
                },
                "image",
            ),
            (
                Policy {
                    env: vec![(b"A=B".to_vec(), vec![])],
                    ..Default::default()
                },
                "env",
            ),
        ];
        for (p, field) in cases {
            let msg = p.validate().unwrap_err().to_string();
            assert!(msg.contains(field), "{msg} should name {field}");
        }
    }

    #[test]
    fn environment_merges_in_order() {
        let p = Policy {
            env: vec![(b"HOME".to_vec(), b"/x".to_vec())],
            ..Default::default()
        };
        let env = p.environment(&[(b"K".to_vec(), b"v".to_vec())]);
        assert!(env.contains(&b"HOME=/x".to_vec()));
        assert!(env.contains(&b"K=v".to_vec()));
        assert!(env.iter().any(|e| e.starts_with(b"PATH=")));
    }
}

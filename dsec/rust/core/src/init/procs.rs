//! Background processes (`spawn`): a command that outlives the call that started it. Each runs
//! under a reaper in a fresh pid namespace, like an exec call (`exec::start_reaper`), so its
//! whole tree dies when it exits or is killed, and with the sandbox (the reapers are children
//! of the sandbox's pid 1). Its memory and tasks are in the sandbox's cgroup.
//!
//! Output goes to two memfds of the init, not to pipes: the init serves one request at a time
//! and never pumps a background process, so a pipe would fill up and stall it. The host reads
//! each stream from where it stopped; what was read is punched out of the memfd (so unread
//! output is what the sandbox's memory holds) and a stream grows to at most `disk_bytes` over
//! the process's life (`RLIMIT_FSIZE`: a write beyond it fails with EFBIG after SIGXFSZ).
//! A record is freed once its process has exited and the host has read both streams to the
//! end; at most [`MAX_PROCS`] records exist at once (a spawn beyond that forgets the oldest
//! exited one whose output was never read, or is refused when all of them run).

use super::confine::Confinement;
use super::exec::{self, Job};
use crate::sys::close;
use crate::wire::{errkind, tag, Enc};
use std::os::fd::RawFd;

/// Most background processes (running, or exited with output not yet read) per sandbox.
pub const MAX_PROCS: usize = 64;

/// Operations on a background process.
pub mod op {
    /// Report the state and read output.
    pub const POLL: u8 = 0;
    /// SIGKILL its tree (no-op once it exited), then report like `POLL` (the output written
    /// until then stays readable).
    pub const KILL: u8 = 1;
}

struct Done {
    /// Raw wait status; `None` when it was killed before it reported.
    status: Option<i32>,
    cpu: f64,
}

struct Proc {
    id: u32,
    reaper: libc::pid_t,
    /// Read end of the reaper's status pipe.
    sr: RawFd,
    /// memfds of stdout and stderr, and how far the host has read each.
    out: [RawFd; 2],
    read: [u64; 2],
    done: Option<Result<Done, String>>,
}

impl Proc {
    /// Collects the reaper if it exited (`block`: wait for it).
    fn reap(&mut self, block: bool) {
        if self.done.is_some() {
            return;
        }
        // SAFETY: rusage is plain data.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let mut st = 0;
        let flags = if block { 0 } else { libc::WNOHANG };
        // SAFETY: waiting for our own child with valid out-pointers.
        let mut r = unsafe { libc::wait4(self.reaper, &mut st, flags, &mut ru) };
        while r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            // SAFETY: as above.
            r = unsafe { libc::wait4(self.reaper, &mut st, flags, &mut ru) };
        }
        if r == self.reaper || r < 0 {
            let report = exec::reaper_report(self.sr);
            close(self.sr);
            self.sr = -1;
            self.done = Some(report.map(|end| Done {
                status: end.map(|(status, _)| status),
                cpu: end.map_or_else(|| exec::cpu_seconds(&ru), |(_, cpu)| cpu),
            }));
        }
    }

    fn close(&mut self) {
        for fd in [self.sr, self.out[0], self.out[1]] {
            close(fd);
        }
    }
}

/// The background processes of one sandbox.
#[derive(Default)]
pub struct Procs {
    next: u32,
    procs: Vec<Proc>,
}

fn memfd(name: &std::ffi::CStr) -> Result<RawFd, String> {
    // SAFETY: memfd_create with a valid name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    crate::sys::cvt(fd).map_err(|e| format!("spawn setup: memfd: {e}"))
}

/// Size of an fd's file.
fn size(fd: RawFd) -> u64 {
    // SAFETY: st is a valid buffer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } == 0 {
        st.st_size.max(0) as u64
    } else {
        0
    }
}

/// Reads up to `max` bytes of `fd` from `*pos`, advances `*pos` and frees the pages read.
fn take(fd: RawFd, pos: &mut u64, max: u64) -> Vec<u8> {
    let end = size(fd).min(pos.saturating_add(max));
    let mut out = vec![0u8; end.saturating_sub(*pos) as usize];
    let mut got = 0usize;
    while got < out.len() {
        // SAFETY: the buffer slice is valid for its length.
        let n = unsafe {
            libc::pread(
                fd,
                out[got..].as_mut_ptr().cast(),
                out.len() - got,
                (*pos + got as u64) as libc::off_t,
            )
        };
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    out.truncate(got);
    *pos += got as u64;
    let whole_pages = *pos & !4095;
    if whole_pages > 0 {
        // SAFETY: fallocate on a memfd we own; failure only keeps the pages.
        unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                whole_pages as libc::off_t,
            )
        };
    }
    out
}

impl Procs {
    /// Starts `job` in the background; returns its id.
    pub fn spawn(
        &mut self,
        job: &Job,
        conf: &Confinement,
        devnull: RawFd,
    ) -> Result<u32, (u8, String)> {
        self.reap();
        if self.procs.len() >= MAX_PROCS {
            // Make room by forgetting the oldest exited process whose output was not read.
            if let Some(i) = self.procs.iter().position(|p| p.done.is_some()) {
                self.procs.remove(i).close();
            }
        }
        if self.procs.len() >= MAX_PROCS {
            return Err((
                errkind::POLICY,
                format!(
                    "this sandbox already runs {MAX_PROCS} background processes; kill one first"
                ),
            ));
        }
        let sandbox = |m: String| (errkind::SANDBOX, m);
        let out = memfd(c"stdout").map_err(sandbox)?;
        let err = match memfd(c"stderr") {
            Ok(fd) => fd,
            Err(m) => {
                close(out);
                return Err(sandbox(m));
            }
        };
        let (reaper, sr) = match exec::start_reaper(job, conf, [devnull, out, err], devnull) {
            Ok(r) => r,
            Err(m) => {
                close(out);
                close(err);
                return Err(sandbox(m));
            }
        };
        self.next += 1;
        self.procs.push(Proc {
            id: self.next,
            reaper,
            sr,
            out: [out, err],
            read: [0, 0],
            done: None,
        });
        Ok(self.next)
    }

    /// SIGKILLs every background process, waits for them and forgets them all.
    pub fn kill_all(&mut self) {
        for mut p in self.procs.drain(..) {
            if p.done.is_none() {
                // SAFETY: signalling our own child; its pid namespace dies with it.
                unsafe { libc::kill(p.reaper, libc::SIGKILL) };
                p.reap(true);
            }
            p.close();
        }
    }

    /// Collects every background process that exited (keeps no zombies around).
    pub fn reap(&mut self) {
        for p in &mut self.procs {
            p.reap(false);
        }
    }

    /// Runs `op` on process `id`, reads at most `max[i]` bytes of each stream, and encodes the
    /// answer: PROC, running u8, has_status u8, status i64, stdout, stderr, stdout_total u64,
    /// stderr_total u64, cpu f64 bits, drained u8 (the record is gone: nothing more to read).
    pub fn op(&mut self, id: u32, what: u8, max: [u64; 2]) -> Result<Vec<u8>, (u8, String)> {
        let Some(i) = self.procs.iter().position(|p| p.id == id) else {
            return Err((
                errkind::POLICY,
                format!("no background process {id} in this sandbox (finished and read, or never started)"),
            ));
        };
        let p = &mut self.procs[i];
        if what == op::KILL && p.done.is_none() {
            // SAFETY: signalling our own child; its pid namespace dies with it.
            unsafe { libc::kill(p.reaper, libc::SIGKILL) };
            p.reap(true);
        } else {
            p.reap(false);
        }
        let mut e = Enc::new(tag::PROC);
        let (running, status, cpu) = match &p.done {
            None => (true, None, 0.0),
            Some(Ok(d)) => (false, d.status, d.cpu),
            Some(Err(m)) => {
                let m = m.clone();
                p.close();
                self.procs.remove(i);
                return Err((errkind::SANDBOX, m));
            }
        };
        e.u8(running as u8);
        match status {
            Some(s) => e.u8(1).i64(i64::from(s)),
            None => e.u8(0).i64(0),
        };
        let outs = [0, 1].map(|s| take(p.out[s], &mut p.read[s], max[s]));
        e.bytes(&outs[0]).bytes(&outs[1]);
        e.u64(size(p.out[0])).u64(size(p.out[1]));
        e.u64(cpu.to_bits());
        let drained = !running && (0..2).all(|s| p.read[s] >= size(p.out[s]));
        e.u8(drained as u8);
        if drained {
            p.close();
            self.procs.remove(i);
        }
        Ok(e.0)
    }
}

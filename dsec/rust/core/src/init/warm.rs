//! The next exec call's reaper, started ahead of it. After each call the init clones it with
//! the call's pipes, and its child confines itself and blocks reading the command from a job
//! pipe. A call then costs one pipe write before the `execve`; the clone, the pipes and the
//! confinement run while the host handles the previous answer.
//!
//! The call is answered on the reaper's report, written once nothing of the call runs any
//! more; the reaper's own exit (its address space and its namespace torn down) finishes after
//! the answer, and the init reaps it before it reads the next request. The child marks a page
//! it shares with the init when it has the command, so a call whose child died before that
//! (nothing ran) is tried once more on a new reaper, and a call killed after it never is.

use super::confine::Confinement;
use super::exec::{
    clone_new_pid, close_all_but, cpu_seconds, reaper_main, ChildArgs, Command, Job, Outcome,
    Report,
};
use super::pump::{pump, HostGone};
use crate::sys::{close, cvt, pipe};
use crate::wire;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// A reaper started before its call; its child is confined and waits for the command.
pub struct Warm {
    reaper: libc::pid_t,
    /// Set by the child when it has the command (the page `Reapers` shares).
    took: &'static AtomicBool,
    job_w: RawFd,
    sr: RawFd,
    out_r: RawFd,
    err_r: RawFd,
    in_w: RawFd,
}

impl Warm {
    /// Clones the reaper with the pipes of one call (`patient`: see `exec::clone_new_pid`);
    /// its child sets `took` when it has the command.
    fn start(
        conf: &Confinement,
        devnull: RawFd,
        patient: bool,
        took: &'static AtomicBool,
    ) -> Result<Warm, String> {
        let fail = |made: &[RawFd], e: std::io::Error| {
            made.iter().for_each(|&fd| close(fd));
            Err(format!("exec setup: {e}"))
        };
        let mut made = [-1; 10];
        for i in 0..5 {
            match pipe() {
                Ok((r, w)) => (made[2 * i], made[2 * i + 1]) = (r, w),
                Err(e) => return fail(&made[..2 * i], e),
            }
        }
        let [out_r, out_w, err_r, err_w, in_r, in_w, sr, sw, job_r, job_w] = made;
        took.store(false, Ordering::SeqCst);
        let reaper = match clone_new_pid(patient) {
            Ok(p) => p,
            Err(e) => return fail(&made, e),
        };
        if reaper == 0 {
            close_all_but(&[out_w, err_w, in_r, sw, job_r, devnull, conf.landlock_fd]);
            let args = ChildArgs {
                devnull,
                job_r,
                took: Some(took),
                ..ChildArgs::new(conf, None, [in_r, out_w, err_w])
            };
            reaper_main(&args, sw, &[in_r, out_w, err_w, job_r]);
        }
        for fd in [out_w, err_w, in_r, sw, job_r] {
            close(fd);
        }
        Ok(Warm {
            reaper,
            took,
            job_w,
            sr,
            out_r,
            err_r,
            in_w,
        })
    }

    /// False once the reaper reported or exited (its child died before a command came).
    fn alive(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.sr,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 0) == 0 }
    }

    fn kill(&self) {
        // SAFETY: signalling our own child; its pid namespace dies with it.
        unsafe { libc::kill(self.reaper, libc::SIGKILL) };
    }

    /// Kills and reaps the reaper (and its waiting child) and closes the call's pipes.
    fn discard(self) {
        self.kill();
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(self.reaper, std::ptr::null_mut(), 0) };
        for fd in [self.job_w, self.sr, self.out_r, self.err_r, self.in_w] {
            close(fd);
        }
    }

    /// Runs `job`; `None` when nothing ran: the child never took the command (`took` unset)
    /// and the call was not cut short. A reaper that reported is still exiting: its pid goes
    /// to `exiting`.
    fn run(
        self,
        job: &Job,
        ctrl: RawFd,
        exiting: &mut Vec<libc::pid_t>,
    ) -> Option<Result<Outcome, String>> {
        let mut pipe = ManuallyDrop::new(unsafe { File::from_raw_fd(self.job_w) });
        let sent = wire::write_frame(&mut *pipe, &Command::encode(job)).is_ok();
        close(self.job_w);
        // The child, just woken, takes the command now rather than once we block.
        // SAFETY: plain syscall.
        unsafe { libc::sched_yield() };
        let stdin = match &job.stdin {
            Some(d) if sent => Some((self.in_w, d.as_slice())),
            _ => {
                close(self.in_w);
                None
            }
        };
        let mut kill = || self.kill();
        if !sent {
            kill();
        }
        let pumped = pump(
            ctrl,
            self.out_r,
            self.err_r,
            stdin,
            &[self.sr],
            job.timeout,
            job.max_output,
            &mut kill,
        );
        if pumped.is_err() {
            self.kill();
        }
        let reported = matches!(&pumped, Ok(p) if p.ready.is_some());
        let mut report = if reported {
            Report::read(self.sr)
        } else {
            Report::parse(&[])
        };
        if report.status.is_some() {
            exiting.push(self.reaper);
        } else {
            // Killed (timeout, cancel, host gone) or died: reap it now, with the CPU time of
            // the processes its namespace's teardown collected.
            // SAFETY: rusage is plain data.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: waiting for our own child with valid out-pointers.
            let _ = cvt(unsafe { libc::wait4(self.reaper, &mut 0, 0, &mut ru) });
            if !reported {
                report = Report::read(self.sr);
            }
            report.cpu = cpu_seconds(&ru);
        }
        close(self.sr);
        let pumped = match pumped {
            Ok(p) => p,
            Err(HostGone) => return Some(Err("host closed the control socket".to_string())),
        };
        if let Some(m) = report.error {
            return Some(Err(format!("cannot confine the command: {m}")));
        }
        if !self.took.load(Ordering::SeqCst) && !pumped.timed_out && !pumped.cancelled {
            return None;
        }
        Some(Ok(Outcome {
            status: report.status,
            pumped,
            cpu: report.cpu,
        }))
    }
}

/// The exec calls' reapers of one sandbox: the one started ahead, those still exiting, and
/// the page shared with their children.
pub struct Reapers {
    warm: Option<Warm>,
    exiting: Vec<libc::pid_t>,
    took: &'static AtomicBool,
}

impl Reapers {
    pub fn new() -> Result<Reapers, String> {
        // SAFETY: a fresh shared anonymous page, kept for the life of the init (so 'static);
        // forked reapers and their children share it.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Reapers {
            warm: None,
            exiting: Vec::new(),
            // SAFETY: the page is zeroed, aligned, and never unmapped.
            took: unsafe { &*(page as *const AtomicBool) },
        })
    }

    /// Between requests: reaps the reapers that reported, and starts the next call's (best
    /// effort; a call without one starts its own).
    pub fn prepare(&mut self, conf: &Confinement, devnull: RawFd) {
        for pid in self.exiting.drain(..) {
            // SAFETY: waiting for our own child; EINTR is retried.
            while unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) } < 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
        }
        if self.warm.is_none() {
            self.warm = Warm::start(conf, devnull, false, self.took).ok();
        }
    }

    /// Kills the reaper started ahead (a reset).
    pub fn discard(&mut self) {
        if let Some(w) = self.warm.take() {
            w.discard();
        }
    }

    /// Runs one exec call on the reaper started ahead (a new one if there is none or it
    /// died), once more on a new one if its child died before it took the command.
    pub fn run(
        &mut self,
        job: &Job,
        conf: &Confinement,
        ctrl: RawFd,
        devnull: RawFd,
    ) -> Result<Outcome, String> {
        for _ in 0..2 {
            let w = match self.warm.take() {
                Some(w) if w.alive() => w,
                stale => {
                    if let Some(w) = stale {
                        w.discard();
                    }
                    Warm::start(conf, devnull, true, self.took)?
                }
            };
            if let Some(r) = w.run(job, ctrl, &mut self.exiting) {
                return r;
            }
        }
        Err("the command's process died before it could start, twice".into())
    }
}

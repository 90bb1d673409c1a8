//! The next exec call's reaper, started ahead of it. After each call the init clones it with
//! the call's pipes, and its child confines itself and blocks reading the command from a job
//! pipe. A call then costs one pipe write before the `execve`; the clone, the pipes and the
//! confinement run while the host handles the previous answer. The child writes `G` on the
//! status pipe once it holds the whole command; a reaper whose child died before that (it
//! never ran the command) is replaced and the call tried once more.

use super::confine::Confinement;
use super::exec::{
    clone_new_pid, close_all_but, cpu_seconds, parse_status, read_all, reaper_main, ChildArgs,
    Command, Job, Outcome,
};
use super::pump::{pump, HostGone};
use crate::sys::{close, cvt, pidfd_open, pipe};
use crate::wire;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};

/// A reaper started before its call; its child is confined and waits for the command.
pub struct Warm {
    reaper: libc::pid_t,
    pidfd: RawFd,
    job_w: RawFd,
    sr: RawFd,
    out_r: RawFd,
    err_r: RawFd,
    in_w: RawFd,
}

impl Warm {
    /// Clones the reaper with the pipes of one call (`patient`: see `exec::clone_new_pid`).
    pub fn start(conf: &Confinement, devnull: RawFd, patient: bool) -> Result<Warm, String> {
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
        let reaper = match clone_new_pid(patient) {
            Ok(p) => p,
            Err(e) => return fail(&made, e),
        };
        if reaper == 0 {
            close_all_but(&[out_w, err_w, in_r, sw, job_r, devnull, conf.landlock_fd]);
            let args = ChildArgs {
                conf,
                cmd: None,
                fds: [in_r, out_w, err_w],
                devnull,
                job_r,
                sw,
            };
            reaper_main(&args, &[in_r, out_w, err_w, job_r]);
        }
        for fd in [out_w, err_w, in_r, sw, job_r] {
            close(fd);
        }
        let warm = Warm {
            reaper,
            pidfd: -1,
            job_w,
            sr,
            out_r,
            err_r,
            in_w,
        };
        match pidfd_open(reaper) {
            Ok(pidfd) => Ok(Warm { pidfd, ..warm }),
            Err(e) => {
                warm.discard();
                Err(format!("exec setup: {e}"))
            }
        }
    }

    /// False once the reaper exited (its child died before a command came).
    fn alive(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.pidfd,
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
    pub fn discard(self) {
        self.kill();
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(self.reaper, std::ptr::null_mut(), 0) };
        for fd in [
            self.pidfd, self.job_w, self.sr, self.out_r, self.err_r, self.in_w,
        ] {
            close(fd);
        }
    }

    /// Runs `job`; `None` when the child never took it (it died before), so nothing ran.
    fn run(self, job: &Job, ctrl: RawFd) -> Option<Result<Outcome, String>> {
        let mut pipe = ManuallyDrop::new(unsafe { File::from_raw_fd(self.job_w) });
        let sent = wire::write_frame(&mut *pipe, &Command::encode(job)).is_ok();
        close(self.job_w);
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
            &[self.pidfd],
            job.timeout,
            job.max_output,
            &mut kill,
        );
        if pumped.is_err() {
            self.kill();
        }
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let mut st = 0;
        // SAFETY: waiting for our own child with valid out-pointers.
        let _ = cvt(unsafe { libc::wait4(self.reaper, &mut st, 0, &mut ru) });
        close(self.pidfd);
        let report = parse_status(&read_all(self.sr));
        close(self.sr);
        let pumped = match pumped {
            Ok(p) => p,
            Err(HostGone) => return Some(Err("host closed the control socket".to_string())),
        };
        if let Some(m) = report.error {
            return Some(Err(format!("cannot confine the command: {m}")));
        }
        if !report.started && !pumped.timed_out {
            return None;
        }
        Some(Ok(Outcome {
            status: report.status,
            pumped,
            cpu: cpu_seconds(&ru),
        }))
    }
}

/// Runs one exec call on the warm reaper (a new one if there is none or it died), once more
/// on a new one if its child died before it took the command.
pub fn run(
    job: &Job,
    conf: &Confinement,
    ctrl: RawFd,
    devnull: RawFd,
    warm: &mut Option<Warm>,
) -> Result<Outcome, String> {
    for _ in 0..2 {
        let w = match warm.take() {
            Some(w) if w.alive() => w,
            stale => {
                if let Some(w) = stale {
                    w.discard();
                }
                Warm::start(conf, devnull, true)?
            }
        };
        if let Some(r) = w.run(job, ctrl) {
            return r;
        }
    }
    Err("the command's process died before it could start, twice".into())
}

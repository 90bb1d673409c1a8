//! The launcher: the process the host actually executes from the memfd, once per host process.
//! It forks one outer init per sandbox, so a new sandbox costs a fork of this small
//! single-threaded process instead of an `execve` (a static binary's start-up runs dozens of
//! CPUID instructions, each a hypervisor exit on virtual machines, and the host's spawn must
//! copy nothing of a huge Python process).
//!
//! Protocol on fd 0 (a Unix stream socket to the host): the host sends one byte with a
//! sandbox's control socket attached; the launcher forks, the child moves that socket to fd 0
//! and runs the outer init; the launcher answers one byte (1 = forked) with a pidfd of the
//! child attached (0 = fork failed, no fd). End of stream (the host closed it or died) ends
//! the launcher; outer inits already started live on, tied to their own control sockets.

use crate::sys::{close, recv_fd, send_fd};

/// Runs the launcher loop; returns the exit code.
pub fn run() -> i32 {
    // SAFETY: process-wide setup of a single-threaded process. Children are reaped by the
    // kernel (SIGCHLD ignored); the host waits on their pidfds.
    unsafe {
        libc::setsid();
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    loop {
        let ctrl = match recv_fd(0) {
            Ok(Some((_, Some(fd)))) => fd,
            Ok(Some((_, None))) => continue,
            _ => return 0,
        };
        let mut pidfd: libc::c_int = -1;
        // SAFETY: fork-like raw clone (no new stack) of a single-threaded process; the kernel
        // writes the child's pidfd into `pidfd`.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                &mut pidfd as *mut libc::c_int as usize,
                0usize,
                0usize,
            )
        };
        if pid == 0 {
            // SAFETY: the child takes the control socket as fd 0 (which closes our end of the
            // launcher socket) and restores the SIGCHLD default the outer init relies on.
            unsafe {
                libc::signal(libc::SIGCHLD, libc::SIG_DFL);
                libc::dup2(ctrl, 0);
                libc::close(ctrl);
                libc::_exit(super::outer::run());
            }
        }
        close(ctrl);
        let sent = if pid > 0 {
            send_fd(0, 1, Some(pidfd))
        } else {
            send_fd(0, 0, None)
        };
        close(pidfd);
        if sent.is_err() {
            return 0;
        }
    }
}

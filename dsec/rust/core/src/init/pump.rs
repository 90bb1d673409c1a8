//! The init's event loop for one call: feed stdin, drain stdout/stderr into bounded captures,
//! watch the control socket (host gone => abort) and the process handle, enforce the deadline.

use crate::capture::Capture;
use crate::sys::{close, now, set_nonblock};
use std::os::fd::RawFd;

/// What one call produced.
pub struct Pumped {
    pub out: Capture,
    pub err: Capture,
    pub timed_out: bool,
    /// The host cancelled the call (interrupt, CPU budget).
    pub cancelled: bool,
    /// Index of the first `waits` fd that became readable.
    pub ready: Option<usize>,
    pub wall: f64,
}

/// Error: the host closed the control socket during the call.
pub struct HostGone;

fn drain(fd: RawFd, cap: &mut Capture, buf: &mut [u8]) -> bool {
    loop {
        // SAFETY: buf is a valid buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            cap.push(&buf[..n as usize]);
            continue;
        }
        if n == 0 {
            return true;
        }
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if e == libc::EINTR {
            continue;
        }
        return e != libc::EAGAIN;
    }
}

/// Runs the loop. `kill` is called once at the deadline; the loop then waits (bounded) for a
/// `waits` fd and the pipe ends so the call returns promptly even if descendants misbehave.
#[allow(clippy::too_many_arguments)]
pub fn pump(
    ctrl: RawFd,
    out_r: RawFd,
    err_r: RawFd,
    stdin: Option<(RawFd, &[u8])>,
    waits: &[RawFd],
    timeout: f64,
    max_output: usize,
    kill: &mut dyn FnMut(),
) -> Result<Pumped, HostGone> {
    let start = now();
    let deadline = start + timeout;
    let mut res = Pumped {
        out: Capture::new(max_output),
        err: Capture::new(max_output),
        timed_out: false,
        cancelled: false,
        ready: None,
        wall: 0.0,
    };
    let (mut out_fd, mut err_fd) = (out_r, err_r);
    let _ = set_nonblock(out_fd);
    let _ = set_nonblock(err_fd);
    let (mut in_fd, data) = match stdin {
        Some((fd, d)) => {
            let _ = set_nonblock(fd);
            (fd, d)
        }
        None => (-1, &[][..]),
    };
    let mut in_pos = 0usize;
    if in_fd >= 0 && data.is_empty() {
        close(in_fd);
        in_fd = -1;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut killed_at: Option<f64> = None;
    loop {
        if res.ready.is_some() && out_fd < 0 && err_fd < 0 {
            break;
        }
        let t = now();
        if killed_at.is_none() && t >= deadline {
            res.timed_out = true;
            kill();
            killed_at = Some(t);
        }
        if let Some(k) = killed_at {
            if t > k + 2.0 {
                break;
            }
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(8);
        let mut push = |fd: RawFd, ev: i16| {
            fds.push(libc::pollfd {
                fd,
                events: ev,
                revents: 0,
            });
        };
        push(ctrl, libc::POLLIN);
        push(out_fd, libc::POLLIN);
        push(err_fd, libc::POLLIN);
        push(in_fd, libc::POLLOUT);
        for &w in waits {
            push(if res.ready.is_some() { -1 } else { w }, libc::POLLIN);
        }
        let wait_ms = match killed_at {
            Some(_) => 50,
            None => (((deadline - t) * 1000.0).ceil() as i32).clamp(1, 60_000),
        };
        // SAFETY: fds is a valid pollfd array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            if read_cancel(ctrl) {
                res.cancelled = true;
                if killed_at.is_none() {
                    kill();
                    killed_at = Some(now());
                }
            } else {
                kill();
                close_all(&mut [out_fd, err_fd, in_fd]);
                return Err(HostGone);
            }
        }
        if fds[1].revents != 0 && drain(out_fd, &mut res.out, &mut buf) {
            close(out_fd);
            out_fd = -1;
        }
        if fds[2].revents != 0 && drain(err_fd, &mut res.err, &mut buf) {
            close(err_fd);
            err_fd = -1;
        }
        if fds[3].revents != 0 {
            if fds[3].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                close(in_fd);
                in_fd = -1;
            } else {
                let chunk = &data[in_pos..data.len().min(in_pos + 64 * 1024)];
                // SAFETY: chunk is a valid buffer.
                let w = unsafe { libc::write(in_fd, chunk.as_ptr().cast(), chunk.len()) };
                if w > 0 {
                    in_pos += w as usize;
                } else if w < 0 {
                    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    if e != libc::EAGAIN && e != libc::EINTR {
                        in_pos = data.len();
                    }
                }
                if in_pos >= data.len() {
                    close(in_fd);
                    in_fd = -1;
                }
            }
        }
        if res.ready.is_none() {
            for (i, p) in fds[4..].iter().enumerate() {
                if p.revents != 0 {
                    res.ready = Some(i);
                    break;
                }
            }
        }
    }
    close_all(&mut [out_fd, err_fd, in_fd]);
    res.wall = now() - start;
    Ok(res)
}

/// Consumes a CANCEL frame from the control socket; false on end of stream or anything else.
fn read_cancel(ctrl: RawFd) -> bool {
    let mut b = [0u8; 5];
    // SAFETY: b is a valid buffer.
    let n = unsafe {
        libc::recv(
            ctrl,
            b.as_mut_ptr().cast(),
            5,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != 5 || b != [1, 0, 0, 0, crate::wire::tag::CANCEL] {
        return false;
    }
    // SAFETY: consuming the 5 bytes just peeked.
    unsafe { libc::recv(ctrl, b.as_mut_ptr().cast(), 5, libc::MSG_DONTWAIT) == 5 }
}

fn close_all(fds: &mut [RawFd]) {
    for fd in fds {
        close(*fd);
        *fd = -1;
    }
}

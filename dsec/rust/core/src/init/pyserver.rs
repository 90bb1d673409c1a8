//! The warm Python worker: `python3 -I -S -c <pyserver.py>` started lazily by the init, confined
//! exactly like an exec, as pid 1 of its own pid namespace. Each call is a fork of the warm
//! interpreter; the server kills the call's whole tree before answering.

use super::confine::{enter, Confinement};
use super::exec::{clone_new_pid, Outcome};
use super::pump::{pump, HostGone};
use crate::sys::{close, cstr, pidfd_open, pipe, write_all_fd};
use std::ffi::CString;
use std::os::fd::RawFd;

/// The server's source, passed with `-c`.
pub const SERVER_PY: &str = include_str!("pyserver.py");

/// A running server.
pub struct PyServer {
    pid: libc::pid_t,
    pidfd: RawFd,
    sock: RawFd,
}

impl PyServer {
    /// Starts the server with the sandbox environment.
    pub fn start(conf: &Confinement, envp: &[CString], devnull: RawFd) -> Result<Self, String> {
        let mut sv = [0; 2];
        // SAFETY: sv is a valid 2-element array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(format!("socketpair: {}", std::io::Error::last_os_error()));
        }
        let python = ["/usr/bin/python3", "/bin/python3", "/usr/local/bin/python3"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("python3 is not available in the sandbox image")?;
        let argv = [python, "-I", "-S", "-c", SERVER_PY]
            .iter()
            .map(|s| cstr(s.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let (sr, sw) = pipe().map_err(|e| e.to_string())?;
        let pid = clone_new_pid(true).map_err(|e| format!("clone: {e}"))?;
        if pid == 0 {
            // SAFETY: fd shuffling in a single-threaded child.
            unsafe {
                libc::dup2(sv[1], 3);
                libc::dup2(devnull, 0);
                libc::dup2(devnull, 1);
                libc::dup2(devnull, 2);
                libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 4u32);
            }
            if let Err(m) = enter(conf) {
                let _ = write_all_fd(sw, m.as_bytes());
                // SAFETY: terminating the child.
                unsafe { libc::_exit(126) };
            }
            // SAFETY: valid C string.
            unsafe { libc::chdir(c"/workspace".as_ptr()) };
            let mut a: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
            a.push(std::ptr::null());
            let mut e: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
            e.push(std::ptr::null());
            // SAFETY: valid null-terminated arrays.
            unsafe { libc::execve(argv[0].as_ptr(), a.as_ptr(), e.as_ptr()) };
            let _ = write_all_fd(
                sw,
                format!("execve python3: {}", std::io::Error::last_os_error()).as_bytes(),
            );
            // SAFETY: terminating the child.
            unsafe { libc::_exit(127) };
        }
        close(sv[1]);
        close(sw);
        // The pipe closes on exec (success) or carries the setup error.
        let mut buf = [0u8; 512];
        // SAFETY: buf is valid.
        let n = unsafe { libc::read(sr, buf.as_mut_ptr().cast(), buf.len()) };
        close(sr);
        if n > 0 {
            close(sv[0]);
            let mut st = 0;
            // SAFETY: reaping our child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            return Err(String::from_utf8_lossy(&buf[..n as usize]).into_owned());
        }
        let pidfd = pidfd_open(pid).map_err(|e| e.to_string())?;
        Ok(PyServer {
            pid,
            pidfd,
            sock: sv[0],
        })
    }

    /// Kills and reaps the server.
    pub fn stop(self) {
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut st = 0;
            libc::waitpid(self.pid, &mut st, 0);
        }
        close(self.pidfd);
        close(self.sock);
    }

    fn send(&self, code: &[u8], timeout: f64, cpu: u64, fds: [RawFd; 2]) -> std::io::Result<()> {
        let mut hdr = Vec::with_capacity(20);
        hdr.extend_from_slice(&(code.len() as u32).to_le_bytes());
        hdr.extend_from_slice(&((timeout * 1000.0) as u64).to_le_bytes());
        hdr.extend_from_slice(&cpu.to_le_bytes());
        let space = unsafe { libc::CMSG_SPACE(8) } as usize;
        let mut cbuf = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        };
        // SAFETY: msghdr points at valid iov and control buffers for the call.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cm = libc::CMSG_FIRSTHDR(&msg);
            (*cm).cmsg_level = libc::SOL_SOCKET;
            (*cm).cmsg_type = libc::SCM_RIGHTS;
            (*cm).cmsg_len = libc::CMSG_LEN(8) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cm), 8);
            if libc::sendmsg(self.sock, &msg, libc::MSG_NOSIGNAL) != hdr.len() as isize {
                return Err(std::io::Error::last_os_error());
            }
        }
        write_all_fd(self.sock, code)
    }

    /// Runs one call. On failure the server is gone and must be restarted by the caller.
    pub fn call(
        self,
        code: &[u8],
        timeout: f64,
        cpu: Option<u64>,
        max_output: usize,
        ctrl: RawFd,
    ) -> (Option<Self>, Result<Outcome, String>) {
        let io = |e: std::io::Error| format!("run_python: {e}");
        let (out_r, out_w) = match pipe() {
            Ok(p) => p,
            Err(e) => return (Some(self), Err(io(e))),
        };
        let (err_r, err_w) = match pipe() {
            Ok(p) => p,
            Err(e) => {
                close(out_r);
                close(out_w);
                return (Some(self), Err(io(e)));
            }
        };
        let sent = self.send(code, timeout, cpu.unwrap_or(0), [out_w, err_w]);
        close(out_w);
        close(err_w);
        if let Err(e) = sent {
            close(out_r);
            close(err_r);
            self.stop();
            return (None, Err(format!("python worker is gone ({e})")));
        }
        let pid = self.pid;
        let mut killed = false;
        let mut kill = || {
            killed = true;
            // SAFETY: signalling our own child (the whole server namespace dies).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        };
        // The server enforces `timeout` itself; the init's deadline is a backstop.
        let r = pump(
            ctrl,
            out_r,
            err_r,
            None,
            &[self.sock, self.pidfd],
            timeout + 1.0,
            max_output,
            &mut kill,
        );
        let pumped = match r {
            Ok(p) => p,
            Err(HostGone) => {
                self.stop();
                return (None, Err("host closed the control socket".into()));
            }
        };
        let mut resp = [0u8; 14];
        let ok = pumped.ready == Some(0) && {
            // SAFETY: resp is valid; the server sends the 14 bytes in one write.
            let n =
                unsafe { libc::recv(self.sock, resp.as_mut_ptr().cast(), 14, libc::MSG_WAITALL) };
            n == 14
        };
        if !ok {
            self.stop();
            let mut p = pumped;
            p.timed_out = p.timed_out || killed;
            return (
                None,
                Ok(Outcome {
                    status: None,
                    pumped: p,
                    cpu: 0.0,
                }),
            );
        }
        let status = i32::from_le_bytes([resp[0], resp[1], resp[2], resp[3]]);
        let mut p = pumped;
        p.timed_out = resp[4] != 0;
        let cpu_ns = u64::from_le_bytes(resp[5..13].try_into().unwrap_or([0; 8]));
        // The server saw its own state changed by the call: it exits; the next call gets a
        // fresh one.
        let server = if resp[13] != 0 {
            self.stop();
            None
        } else {
            Some(self)
        };
        (
            server,
            Ok(Outcome {
                status: Some(status),
                pumped: p,
                cpu: cpu_ns as f64 * 1e-9,
            }),
        )
    }
}

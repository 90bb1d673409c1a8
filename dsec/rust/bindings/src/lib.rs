//! `dsec._native`: the thin PyO3 layer over `dsec-core`. It converts arguments (every bad value
//! becomes a `PolicyError`/`PathError` naming it), releases the interpreter around every
//! blocking call, maps the core error enum onto one exception tree, and turns panics into
//! `SandboxError`.

#![deny(clippy::unwrap_used, clippy::expect_used)]

use dsec_core::check as probe;
use dsec_core::host::{ExecOutput, ExecRequest, InitImage, ProcessState, Sandbox};
use dsec_core::{Error, Policy};
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple, PyType};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The init binary, built by build.rs and executed from a sealed memfd.
static INIT: &[u8] = include_bytes!(env!("DSEC_INIT_PATH"));

fn init_image() -> InitImage {
    InitImage::Bytes(INIT)
}

pyo3::create_exception!(
    _native,
    SandboxError,
    PyException,
    "Base class of every dsec error."
);
pyo3::create_exception!(
    _native,
    SandboxSetupError,
    SandboxError,
    "The sandbox could not be created with the requested isolation."
);
pyo3::create_exception!(
    _native,
    PathError,
    SandboxError,
    "A path is invalid or escapes the sandbox root."
);
pyo3::create_exception!(
    _native,
    SandboxClosedError,
    SandboxError,
    "The sandbox is closed."
);

static POLICY_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn policy_error_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    POLICY_ERROR
        .get_or_try_init(py, || {
            let bases = PyTuple::new(
                py,
                [py.get_type::<SandboxError>(), py.get_type::<PyValueError>()],
            )?;
            let ns = PyDict::new(py);
            ns.set_item("__module__", "dsec._native")?;
            ns.set_item(
                "__doc__",
                "An invalid limit or argument (also a ValueError).",
            )?;
            let t = py.get_type::<PyType>().call1(("PolicyError", bases, ns))?;
            Ok::<_, PyErr>(t.cast_into::<PyType>()?.unbind())
        })
        .map(|t| t.bind(py))
}

fn policy_err(py: Python<'_>, msg: String) -> PyErr {
    match policy_error_type(py) {
        Ok(t) => PyErr::from_type(t.clone(), msg),
        Err(e) => e,
    }
}

fn to_py(py: Python<'_>, e: Error) -> PyErr {
    match e {
        Error::Policy(m) => policy_err(py, m),
        Error::Path(m) => PathError::new_err(m),
        Error::Setup(_) => SandboxSetupError::new_err(e.to_string()),
        Error::Closed => SandboxClosedError::new_err("the sandbox is closed"),
        Error::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err("call interrupted"),
        Error::Sandbox(_) => SandboxError::new_err(e.to_string()),
    }
}

/// Runs an interruptible core call without the interpreter attached: about every 100 ms the
/// waiting thread briefly attaches to run Python's signal handlers; an exception from them
/// (Ctrl-C's KeyboardInterrupt) cancels the call inside the sandbox and is re-raised.
fn interruptible<T: Send>(
    py: Python<'_>,
    f: impl FnOnce(dsec_core::host::Interrupt<'_>) -> dsec_core::Result<T> + Send,
) -> PyResult<T> {
    // Only the main thread runs signal handlers; other threads (and daemon threads that may
    // outlive the interpreter) never re-attach.
    if !on_main_thread(py) {
        return blocking(py, || f(&|| false));
    }
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let poll = || {
        Python::try_attach(|py| match py.check_signals() {
            Ok(()) => false,
            Err(e) => {
                if let Ok(mut slot) = raised.lock() {
                    slot.get_or_insert(e);
                }
                true
            }
        })
        .unwrap_or(false)
    };
    let r = blocking(py, || f(&poll));
    let pending = raised.lock().ok().and_then(|mut s| s.take());
    match (r, pending) {
        (_, Some(e)) => Err(e),
        (r, None) => r,
    }
}

fn on_main_thread(py: Python<'_>) -> bool {
    let check = || -> PyResult<bool> {
        let threading = py.import("threading")?;
        let main = threading.call_method0("main_thread")?.getattr("ident")?;
        let me = threading.call_method0("get_ident")?;
        main.eq(me)
    };
    check().unwrap_or(false)
}

/// Runs a blocking core call without the interpreter attached; panics become SandboxError.
fn blocking<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> dsec_core::Result<T> + Send,
) -> PyResult<T> {
    let r = py.detach(|| {
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Error::Sandbox(format!("internal error (panic): {msg}")))
        })
    });
    let r = r.map_err(|e| to_py(py, e));
    py.check_signals()?;
    r
}

fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn repr(o: &Bound<'_, PyAny>) -> String {
    o.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn int_arg(py: Python<'_>, name: &str, o: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    let Some(o) = o.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    if o.is_instance_of::<pyo3::types::PyBool>() || o.is_instance_of::<pyo3::types::PyFloat>() {
        return Err(policy_err(
            py,
            format!("{name} must be an int, got {} {}", type_name(o), repr(o)),
        ));
    }
    match o.extract::<i128>() {
        Ok(v) if v < 0 => Err(policy_err(
            py,
            format!("{name} must not be negative, got {v}"),
        )),
        Ok(v) => u64::try_from(v)
            .map(Some)
            .map_err(|_| policy_err(py, format!("{name} is too large, got {v}"))),
        Err(_) => Err(policy_err(
            py,
            format!("{name} must be an int, got {} {}", type_name(o), repr(o)),
        )),
    }
}

fn float_arg(py: Python<'_>, name: &str, o: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f64>> {
    let Some(o) = o.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    if o.is_instance_of::<pyo3::types::PyBool>() {
        return Err(policy_err(
            py,
            format!("{name} must be a number, got {}", repr(o)),
        ));
    }
    let v = o.extract::<f64>().map_err(|_| {
        policy_err(
            py,
            format!("{name} must be a number, got {} {}", type_name(o), repr(o)),
        )
    })?;
    if !v.is_finite() || v <= 0.0 {
        return Err(policy_err(
            py,
            format!("{name} must be a positive finite number, got {v}"),
        ));
    }
    Ok(Some(v))
}

fn utf8(py: Python<'_>, name: &str, o: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let bad = |why: &str| policy_err(py, format!("{name} {why}: {}", repr(o)));
    let b = if let Ok(s) = o.cast::<PyString>() {
        s.to_str()
            .map_err(|_| bad("is not valid UTF-8"))?
            .as_bytes()
            .to_vec()
    } else if let Ok(b) = o.cast::<PyBytes>() {
        let v = b.as_bytes().to_vec();
        std::str::from_utf8(&v).map_err(|_| bad("is not valid UTF-8"))?;
        v
    } else {
        return Err(policy_err(
            py,
            format!("{name} must be a str, got {} {}", type_name(o), repr(o)),
        ));
    };
    if b.contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    Ok(b)
}

fn env_arg(py: Python<'_>, o: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let Some(o) = o.filter(|o| !o.is_none()) else {
        return Ok(Vec::new());
    };
    let d = o.cast::<PyDict>().map_err(|_| {
        policy_err(
            py,
            format!("env must be a dict of str to str, got {}", type_name(o)),
        )
    })?;
    let mut out = Vec::new();
    for (k, v) in d.iter() {
        let kb = utf8(py, "env key", &k)?;
        let vb = utf8(py, &format!("env[{}]", repr(&k)), &v)?;
        if kb.is_empty() || kb.contains(&b'=') {
            return Err(policy_err(
                py,
                format!("env key {} is not a valid variable name", repr(&k)),
            ));
        }
        out.push((kb, vb));
    }
    Ok(out)
}

fn data_arg(py: Python<'_>, name: &str, o: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = o.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(b) = o.cast::<PyByteArray>() {
        return Ok(b.to_vec());
    }
    if let Ok(s) = o.cast::<PyString>() {
        return s
            .to_str()
            .map(|s| s.as_bytes().to_vec())
            .map_err(|_| policy_err(py, format!("{name} is a str that is not valid UTF-8")));
    }
    Err(policy_err(
        py,
        format!("{name} must be bytes or str, got {}", type_name(o)),
    ))
}

fn path_arg(o: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let p = o
        .py()
        .import("os")?
        .getattr("fspath")?
        .call1((o,))
        .map_err(|_| {
            PathError::new_err(format!(
                "path must be a str or os.PathLike, got {}",
                type_name(o)
            ))
        })?;
    let b = if let Ok(s) = p.cast::<PyString>() {
        s.to_str()
            .map_err(|_| PathError::new_err(format!("path {} is not valid UTF-8", repr(o))))?
            .as_bytes()
            .to_vec()
    } else if let Ok(b) = p.cast::<PyBytes>() {
        b.as_bytes().to_vec()
    } else {
        return Err(PathError::new_err(format!(
            "path must be a str, got {}",
            type_name(o)
        )));
    };
    if b.contains(&0) {
        return Err(PathError::new_err(format!(
            "path {} contains a NUL byte",
            repr(o)
        )));
    }
    if b.is_empty() {
        return Err(PathError::new_err("path must not be empty"));
    }
    Ok(b)
}

/// argv of a `cmd` argument: a str runs through /bin/sh -c, a list or tuple of str is argv.
fn argv_arg(py: Python<'_>, cmd: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u8>>> {
    let argv: Vec<Vec<u8>> = if cmd.is_instance_of::<PyString>() {
        vec![b"/bin/sh".to_vec(), b"-c".to_vec(), utf8(py, "cmd", cmd)?]
    } else if cmd.is_instance_of::<PyList>() || cmd.is_instance_of::<PyTuple>() {
        let mut v = Vec::new();
        for (i, a) in cmd.try_iter()?.enumerate() {
            v.push(utf8(py, &format!("cmd[{i}]"), &a?)?);
        }
        if v.is_empty() {
            return Err(policy_err(py, "cmd must not be an empty list".into()));
        }
        v
    } else {
        return Err(policy_err(
            py,
            format!("cmd must be a str or a list of str, got {}", type_name(cmd)),
        ));
    };
    Ok(argv)
}

/// The result of one `exec` or `run_python` call. A failing program is data, not an error.
#[pyclass(frozen, module = "dsec._native", name = "ExecResult")]
struct PyExecResult {
    #[pyo3(get)]
    exit_code: Option<i32>,
    #[pyo3(get)]
    signal: Option<i32>,
    #[pyo3(get)]
    stdout: Py<PyBytes>,
    #[pyo3(get)]
    stderr: Py<PyBytes>,
    #[pyo3(get)]
    timed_out: bool,
    #[pyo3(get)]
    oom_killed: bool,
    #[pyo3(get)]
    stdout_truncated: bool,
    #[pyo3(get)]
    stderr_truncated: bool,
    #[pyo3(get)]
    stdout_total: u64,
    #[pyo3(get)]
    stderr_total: u64,
    #[pyo3(get)]
    wall_time: f64,
    #[pyo3(get)]
    cpu_time: f64,
    #[pyo3(get)]
    peak_memory: u64,
}

#[pymethods]
impl PyExecResult {
    /// True when the program exited with status 0 (no signal, no timeout).
    #[getter]
    fn ok(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let show = |b: &Py<PyBytes>| {
            let b = b.bind(py).as_bytes();
            let head = &b[..b.len().min(60)];
            let more = if b.len() > 60 {
                format!("…+{}B", b.len() - 60)
            } else {
                String::new()
            };
            format!("{:?}{more}", String::from_utf8_lossy(head))
        };
        let opt = |v: Option<i32>| v.map_or("None".to_string(), |x| x.to_string());
        let mut flags = Vec::new();
        for (on, n) in [
            (self.timed_out, "timed_out"),
            (self.oom_killed, "oom_killed"),
            (self.stdout_truncated, "stdout_truncated"),
            (self.stderr_truncated, "stderr_truncated"),
        ] {
            if on {
                flags.push(format!(", {n}=True"));
            }
        }
        format!(
            "ExecResult(exit_code={}, signal={}{}, stdout={}, stderr={}, wall_time={:.4}, cpu_time={:.4}, peak_memory={})",
            opt(self.exit_code),
            opt(self.signal),
            flags.concat(),
            show(&self.stdout),
            show(&self.stderr),
            self.wall_time,
            self.cpu_time,
            self.peak_memory
        )
    }
}

fn result(py: Python<'_>, o: ExecOutput) -> PyExecResult {
    PyExecResult {
        exit_code: o.exit_code,
        signal: o.signal,
        stdout: PyBytes::new(py, &o.stdout).unbind(),
        stderr: PyBytes::new(py, &o.stderr).unbind(),
        timed_out: o.timed_out,
        oom_killed: o.oom_killed,
        stdout_truncated: o.stdout_truncated,
        stderr_truncated: o.stderr_truncated,
        stdout_total: o.stdout_total,
        stderr_total: o.stderr_total,
        wall_time: o.wall_time,
        cpu_time: o.cpu_time,
        peak_memory: o.peak_memory,
    }
}

/// A persistent sandbox (see the `dsec.Sandbox` docstring for the keyword arguments).
#[pyclass(frozen, subclass, module = "dsec._native", name = "Sandbox")]
struct PySandbox {
    inner: Arc<Sandbox>,
    /// Handle generation shared by every handle of `inner`: a pool hands a reset sandbox to
    /// its next user under a new handle (`_handoff`), and older handles go stale (closed).
    lease: Arc<AtomicU64>,
    generation: u64,
}

impl PySandbox {
    fn stale(&self) -> bool {
        self.lease.load(Ordering::Acquire) != self.generation
    }

    /// The sandbox, unless this handle was handed on.
    fn sb(&self) -> PyResult<Arc<Sandbox>> {
        if self.stale() {
            return Err(SandboxClosedError::new_err(
                "the sandbox is closed (this handle was released to its pool)",
            ));
        }
        Ok(self.inner.clone())
    }
}

#[pymethods]
impl PySandbox {
    #[new]
    #[pyo3(signature = (*, memory_bytes=None, max_pids=None, cpu_seconds=None, timeout=None,
        max_output_bytes=None, disk_bytes=None, max_open_files=None, network=None, image=None,
        env=None, require_landlock=None, cpus=None, uid_range=None, snapshot=None,
        _handoff=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        memory_bytes: Option<&Bound<'_, PyAny>>,
        max_pids: Option<&Bound<'_, PyAny>>,
        cpu_seconds: Option<&Bound<'_, PyAny>>,
        timeout: Option<&Bound<'_, PyAny>>,
        max_output_bytes: Option<&Bound<'_, PyAny>>,
        disk_bytes: Option<&Bound<'_, PyAny>>,
        max_open_files: Option<&Bound<'_, PyAny>>,
        network: Option<&Bound<'_, PyAny>>,
        image: Option<&Bound<'_, PyAny>>,
        env: Option<&Bound<'_, PyAny>>,
        require_landlock: Option<&Bound<'_, PyAny>>,
        cpus: Option<&Bound<'_, PyAny>>,
        uid_range: Option<&Bound<'_, PyAny>>,
        snapshot: Option<&Bound<'_, PyAny>>,
        _handoff: Option<PyRef<'_, PySandbox>>,
    ) -> PyResult<Self> {
        if let Some(old) = _handoff {
            // A pool's hand-over: same sandbox, new handle; the old one goes stale.
            let sb = old.sb()?;
            let generation = old.generation + 1;
            if old
                .lease
                .compare_exchange(
                    old.generation,
                    generation,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
            {
                return Err(SandboxClosedError::new_err(
                    "the sandbox was handed on already",
                ));
            }
            return Ok(PySandbox {
                inner: sb,
                lease: old.lease.clone(),
                generation,
            });
        }
        let mut p = Policy::default();
        let bool_arg = |name: &str, o: Option<&Bound<'_, PyAny>>, d: bool| -> PyResult<bool> {
            match o.filter(|o| !o.is_none()) {
                None => Ok(d),
                Some(o) => o
                    .cast::<pyo3::types::PyBool>()
                    .map(|b| b.is_true())
                    .map_err(|_| policy_err(py, format!("{name} must be a bool, got {}", repr(o)))),
            }
        };
        if let Some(v) = int_arg(py, "memory_bytes", memory_bytes)? {
            p.memory_bytes = v;
        }
        if let Some(v) = int_arg(py, "max_pids", max_pids)? {
            p.max_pids = v;
        }
        if let Some(v) = float_arg(py, "cpu_seconds", cpu_seconds)? {
            p.cpu_seconds = Some(v.ceil() as u64);
        }
        if let Some(v) = float_arg(py, "timeout", timeout)? {
            p.timeout = v;
        }
        if let Some(v) = float_arg(py, "cpus", cpus)? {
            p.cpus = Some(v);
        }
        if let Some(o) = uid_range.filter(|o| !o.is_none()) {
            let bad = || {
                policy_err(
                    py,
                    format!("uid_range must be (first, count), got {}", repr(o)),
                )
            };
            let (a, b): (Bound<'_, PyAny>, Bound<'_, PyAny>) = o.extract().map_err(|_| bad())?;
            let first = int_arg(py, "uid_range[0]", Some(&a))?.ok_or_else(bad)?;
            let count = int_arg(py, "uid_range[1]", Some(&b))?.ok_or_else(bad)?;
            p.uid_range = (
                u32::try_from(first).map_err(|_| bad())?,
                u32::try_from(count).map_err(|_| bad())?,
            );
        }
        if let Some(v) = int_arg(py, "max_output_bytes", max_output_bytes)? {
            p.max_output_bytes = v;
        }
        if let Some(v) = int_arg(py, "disk_bytes", disk_bytes)? {
            p.disk_bytes = v;
        }
        if let Some(v) = int_arg(py, "max_open_files", max_open_files)? {
            p.max_open_files = v;
        }
        p.network = bool_arg("network", network, false)?;
        p.require_landlock = bool_arg("require_landlock", require_landlock, true)?;
        if let Some(o) = image.filter(|o| !o.is_none()) {
            let b = path_arg(o).map_err(|_| {
                policy_err(
                    py,
                    format!("image must be a directory path, got {}", repr(o)),
                )
            })?;
            p.image = Some(b);
        }
        p.env = env_arg(py, env)?;
        if let Some(o) = snapshot.filter(|o| !o.is_none()) {
            let b = path_arg(o).map_err(|_| {
                policy_err(
                    py,
                    format!("snapshot must be a dsec.Snapshot, got {}", repr(o)),
                )
            })?;
            p.snapshot = Some(b);
        }
        let sb = blocking(py, move || Sandbox::new(p, &init_image()))?;
        Ok(PySandbox {
            inner: Arc::new(sb),
            lease: Arc::new(AtomicU64::new(0)),
            generation: 0,
        })
    }

    /// Runs `cmd` (str: via /bin/sh -c; list of str: argv) and returns an ExecResult.
    #[pyo3(signature = (cmd, *, timeout=None, stdin=None, env=None, cwd=None))]
    fn exec(
        &self,
        py: Python<'_>,
        cmd: &Bound<'_, PyAny>,
        timeout: Option<&Bound<'_, PyAny>>,
        stdin: Option<&Bound<'_, PyAny>>,
        env: Option<&Bound<'_, PyAny>>,
        cwd: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyExecResult> {
        let argv = argv_arg(py, cmd)?;
        let req = ExecRequest {
            argv,
            env: env_arg(py, env)?,
            cwd: cwd
                .filter(|c| !c.is_none())
                .map(|c| utf8(py, "cwd", c))
                .transpose()?,
            stdin: stdin
                .filter(|s| !s.is_none())
                .map(|s| data_arg(py, "stdin", s))
                .transpose()?,
            timeout: float_arg(py, "timeout", timeout)?,
        };
        let sb = self.sb()?;
        let o = interruptible(py, move |stop| sb.exec_with(&req, stop))?;
        Ok(result(py, o))
    }

    /// Runs Python source in the sandbox's warm interpreter (a fresh fork per call).
    #[pyo3(signature = (code, *, timeout=None))]
    fn run_python(
        &self,
        py: Python<'_>,
        code: &Bound<'_, PyAny>,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyExecResult> {
        let code = data_arg(py, "code", code)?;
        let t = float_arg(py, "timeout", timeout)?;
        let sb = self.sb()?;
        let o = interruptible(py, move |stop| sb.run_python_with(&code, t, stop))?;
        Ok(result(py, o))
    }

    /// Reads a regular file beneath the sandbox root (relative paths: beneath /workspace);
    /// streamed in chunks, refused (PathError) when larger than `max_bytes`.
    #[pyo3(signature = (path, *, max_bytes=None))]
    fn read_file<'py>(
        &self,
        py: Python<'py>,
        path: &Bound<'py, PyAny>,
        max_bytes: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let p = path_arg(path)?;
        let max = int_arg(py, "max_bytes", max_bytes)?;
        let sb = self.sb()?;
        let data = blocking(py, move || sb.read_file(&p, max))?;
        Ok(PyBytes::new(py, &data))
    }

    /// Creates or replaces a regular file beneath the sandbox root (`parents`: creating
    /// missing directories above it).
    #[pyo3(signature = (path, data, *, parents=None))]
    fn write_file(
        &self,
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
        parents: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let p = path_arg(path)?;
        let d = data_arg(py, "data", data)?;
        let parents = match parents {
            None => false,
            Some(o) => o
                .cast::<pyo3::types::PyBool>()
                .map(|b| b.is_true())
                .map_err(|_| policy_err(py, format!("parents must be a bool, got {}", repr(o))))?,
        };
        let sb = self.sb()?;
        blocking(py, move || sb.write_file(&p, &d, parents))
    }

    /// Copies /workspace into the empty host directory `dest` (dsec.Snapshot uses it);
    /// returns counts: dirs, files, symlinks, bytes, skipped.
    fn _export_workspace<'py>(
        &self,
        py: Python<'py>,
        dest: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let d = path_arg(dest)?;
        let sb = self.sb()?;
        let path = std::path::PathBuf::from(String::from_utf8_lossy(&d).into_owned());
        let e = blocking(py, move || sb.export_workspace(&path))?;
        let out = PyDict::new(py);
        out.set_item("dirs", e.dirs)?;
        out.set_item("files", e.files)?;
        out.set_item("symlinks", e.symlinks)?;
        out.set_item("bytes", e.bytes)?;
        out.set_item("skipped", e.skipped)?;
        Ok(out)
    }

    /// Starts `cmd` in the background and returns its `Process` at once.
    #[pyo3(signature = (cmd, *, env=None, cwd=None))]
    fn spawn(
        &self,
        py: Python<'_>,
        cmd: &Bound<'_, PyAny>,
        env: Option<&Bound<'_, PyAny>>,
        cwd: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyProcess> {
        let req = ExecRequest {
            argv: argv_arg(py, cmd)?,
            env: env_arg(py, env)?,
            cwd: cwd
                .filter(|c| !c.is_none())
                .map(|c| utf8(py, "cwd", c))
                .transpose()?,
            stdin: None,
            timeout: None,
        };
        let args: Vec<String> = req
            .argv
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let sb = self.sb()?;
        let id = blocking(py, move || sb.spawn(&req))?;
        Ok(PyProcess {
            sandbox: self.inner.clone(),
            lease: (self.lease.clone(), self.generation),
            id,
            args,
            state: Mutex::new(ProcCache::default()),
        })
    }

    /// Resets the sandbox for a new user (dsec.SandboxPool calls it between users): kills
    /// every process, empties /workspace, /tmp and /dev/shm, removes System V IPC objects.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        let sb = self.sb()?;
        blocking(py, move || sb.reset())
    }

    /// Closes the sandbox: every process in it is killed, its mounts and cgroup disappear.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.stale() {
            return Ok(()); // handed on: the sandbox is someone else's now
        }
        let sb = self.inner.clone();
        blocking(py, move || {
            sb.close();
            Ok(())
        })
    }

    /// Whether the sandbox is closed.
    #[getter]
    fn closed(&self) -> bool {
        self.stale() || self.inner.is_closed()
    }

    /// Host pid of the sandbox's init (pid 1 inside), for posture checks from outside.
    #[getter]
    fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// The effective limits, as a dict.
    #[getter]
    fn limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = self.inner.policy();
        let d = PyDict::new(py);
        d.set_item("memory_bytes", p.memory_bytes)?;
        d.set_item("max_pids", p.max_pids)?;
        d.set_item("cpu_seconds", p.cpu_seconds)?;
        d.set_item("timeout", p.timeout)?;
        d.set_item("max_output_bytes", p.max_output_bytes)?;
        d.set_item("disk_bytes", p.disk_bytes)?;
        d.set_item("max_open_files", p.max_open_files)?;
        d.set_item("network", p.network)?;
        d.set_item("cpus", p.cpus)?;
        d.set_item("cpu_bandwidth_enforced", self.inner.cpu_limited())?;
        let b = p.memory_budget();
        let t = PyDict::new(py);
        t.set_item("workspace", b.tmpfs_bytes)?;
        t.set_item("tmp", b.tmpfs_bytes)?;
        t.set_item("dev_shm", b.shm_bytes)?;
        t.set_item("sysv_shm", b.shm_bytes)?;
        d.set_item("tmpfs_bytes", t)?;
        d.set_item("tcp_bytes", p.tcp_bytes())?;
        d.set_item("uid_range", p.uid_range)?;
        d.set_item("host_uid", p.host_id)?;
        Ok(d)
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let state = if self.stale() || self.inner.is_closed() {
            "closed"
        } else {
            "open"
        };
        format!("<dsec.Sandbox pid={} {state}>", self.inner.pid())
    }
}

/// What the host knows of a background process once it exited.
#[derive(Default)]
struct ProcCache {
    /// `(exit_code, signal, cpu_time)` once it exited.
    done: Option<(Option<i32>, Option<i32>, f64)>,
    /// The sandbox forgot it (exited, all output read): no more requests.
    drained: bool,
    /// Output fetched by poll/wait but not yet handed out by read_stdout/read_stderr.
    pending: [Vec<u8>; 2],
}

/// A background process started by `Sandbox.spawn`.
#[pyclass(frozen, module = "dsec._native", name = "Process")]
struct PyProcess {
    sandbox: Arc<Sandbox>,
    /// The lease of the handle that spawned it: once that handle is handed on (a pool
    /// reset killed the process), every request is refused.
    lease: (Arc<AtomicU64>, u64),
    id: u32,
    args: Vec<String>,
    state: Mutex<ProcCache>,
}

impl PyProcess {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProcCache> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, s: &ProcessState) {
        let mut c = self.lock();
        if !s.running {
            c.done = Some((s.exit_code, s.signal, s.cpu_time));
        }
        c.drained |= s.drained;
        c.pending[0].extend_from_slice(&s.stdout);
        c.pending[1].extend_from_slice(&s.stderr);
    }

    /// One request (`kill`: SIGKILL first) reading at most `max` bytes of each stream,
    /// unless the sandbox already forgot the process.
    fn request(&self, py: Python<'_>, kill: bool, max: [u64; 2]) -> PyResult<()> {
        if self.lock().drained {
            return Ok(());
        }
        self.live()?;
        let (sb, id) = (self.sandbox.clone(), self.id);
        let s = blocking(py, move || sb.process(id, kill, max[0], max[1]))?;
        self.record(&s);
        Ok(())
    }

    fn live(&self) -> PyResult<()> {
        if self.lease.0.load(Ordering::Acquire) != self.lease.1 {
            return Err(SandboxClosedError::new_err(
                "the sandbox is closed (its handle was released to its pool)",
            ));
        }
        Ok(())
    }

    fn returncode_of(c: &ProcCache) -> Option<i32> {
        c.done
            .map(|(code, sig, _)| code.unwrap_or(-sig.unwrap_or(0)))
    }

    fn read(
        &self,
        py: Python<'_>,
        stream: usize,
        max: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyBytes>> {
        let max = int_arg(py, "max_bytes", max)?.unwrap_or(self.sandbox.policy().max_output_bytes);
        let have = self.lock().pending[stream].len() as u64;
        if have < max {
            let mut want = [0, 0];
            want[stream] = max - have;
            self.request(py, false, want)?;
        }
        let mut c = self.lock();
        let buf = &mut c.pending[stream];
        let n = buf.len().min(usize::try_from(max).unwrap_or(usize::MAX));
        let out: Vec<u8> = buf.drain(..n).collect();
        Ok(PyBytes::new(py, &out).unbind())
    }
}

#[pymethods]
impl PyProcess {
    /// None while it runs, else its return code (exit status, or minus the signal number).
    fn poll(&self, py: Python<'_>) -> PyResult<Option<i32>> {
        if self.lock().done.is_none() {
            self.request(py, false, [0, 0])?;
        }
        Ok(Self::returncode_of(&self.lock()))
    }

    /// Waits until it exits and returns its return code; TimeoutError after `timeout`
    /// seconds (it keeps running). The sandbox serves other calls meanwhile.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<i32> {
        let t = float_arg(py, "timeout", timeout)?;
        if let Some(rc) = Self::returncode_of(&self.lock()) {
            return Ok(rc);
        }
        self.live()?;
        let (sb, id) = (self.sandbox.clone(), self.id);
        let s = interruptible(py, move |stop| sb.wait_process(id, t, stop))?;
        match s {
            Some(s) => {
                self.record(&s);
                Ok(Self::returncode_of(&self.lock()).unwrap_or(0))
            }
            None => Err(pyo3::exceptions::PyTimeoutError::new_err(format!(
                "process {} did not exit within {} s",
                self.id,
                t.unwrap_or(0.0)
            ))),
        }
    }

    /// SIGKILLs it and everything it started; returns once they are gone. No-op once it
    /// exited. Its output so far stays readable.
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        if self.lock().done.is_none() {
            self.request(py, true, [0, 0])?;
        }
        Ok(())
    }

    /// Output written to stdout since the last read (at most `max_bytes`, default
    /// `max_output_bytes`); b"" when there is none yet. Does not wait.
    #[pyo3(signature = (max_bytes=None))]
    fn read_stdout(
        &self,
        py: Python<'_>,
        max_bytes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyBytes>> {
        self.read(py, 0, max_bytes)
    }

    /// Like `read_stdout`, for stderr.
    #[pyo3(signature = (max_bytes=None))]
    fn read_stderr(
        &self,
        py: Python<'_>,
        max_bytes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyBytes>> {
        self.read(py, 1, max_bytes)
    }

    /// Return code once it exited (as last seen by poll/wait/kill), else None.
    #[getter]
    fn returncode(&self) -> Option<i32> {
        Self::returncode_of(&self.lock())
    }

    /// Exit status once it exited normally, else None.
    #[getter]
    fn exit_code(&self) -> Option<i32> {
        self.lock().done.and_then(|d| d.0)
    }

    /// Signal that ended it (9 after kill()), else None.
    #[getter]
    fn signal(&self) -> Option<i32> {
        self.lock().done.and_then(|d| d.1)
    }

    /// CPU seconds of its whole tree, once it exited (else None).
    #[getter]
    fn cpu_time(&self) -> Option<f64> {
        self.lock().done.map(|d| d.2)
    }

    /// The argv it was started with.
    #[getter]
    fn args(&self) -> Vec<String> {
        self.args.clone()
    }

    /// Its id within the sandbox.
    #[getter]
    fn id(&self) -> u32 {
        self.id
    }

    fn __repr__(&self) -> String {
        let c = self.lock();
        let state = match Self::returncode_of(&c) {
            None => "running".to_string(),
            Some(rc) => format!("returncode={rc}"),
        };
        format!("<dsec.Process {} {:?} {state}>", self.id, self.args)
    }
}

/// Probes which isolation features this kernel enforces (creates one real sandbox).
#[pyfunction]
fn check(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let r = py
        .detach(|| catch_unwind(|| probe::probe(&init_image())))
        .map_err(|_| SandboxError::new_err("internal error (panic) in check()"))?;
    let d = PyDict::new(py);
    for (k, v) in &r.namespaces {
        d.set_item(*k, *v)?;
    }
    d.set_item("seccomp", r.seccomp)?;
    d.set_item("landlock_abi", r.landlock_abi)?;
    d.set_item("landlock_enforced", r.landlock_enforced)?;
    d.set_item("cgroup", r.cgroup.clone())?;
    let c = PyDict::new(py);
    for (k, v) in &r.controllers {
        c.set_item(*k, *v)?;
    }
    d.set_item("controllers", c)?;
    let p = PyDict::new(py);
    for (k, v) in &r.posture {
        p.set_item(k, v)?;
    }
    d.set_item("posture", p)?;
    let h = PyDict::new(py);
    for (k, v) in &r.hardening {
        h.set_item(*k, *v)?;
    }
    d.set_item("hardening", h)?;
    d.set_item("enforced", r.enforced)?;
    d.set_item("problems", r.problems.clone())?;
    d.set_item("warnings", r.warnings.clone())?;
    Ok(d)
}

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SandboxError", py.get_type::<SandboxError>())?;
    m.add("SandboxSetupError", py.get_type::<SandboxSetupError>())?;
    m.add("PathError", py.get_type::<PathError>())?;
    m.add("SandboxClosedError", py.get_type::<SandboxClosedError>())?;
    m.add("PolicyError", policy_error_type(py)?)?;
    m.add_class::<PySandbox>()?;
    m.add_class::<PyExecResult>()?;
    m.add_class::<PyProcess>()?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add("INIT_BINARY_BYTES", INIT.len())?;
    Ok(())
}

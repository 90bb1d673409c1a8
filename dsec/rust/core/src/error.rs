//! The crate's error type; every module maps its failures into one of these variants.

/// Errors of the sandbox core. The Python binding maps each variant onto one exception class.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A limit or argument is invalid (names the field and value).
    #[error("{0}")]
    Policy(String),
    /// A path is invalid or escapes the sandbox root (names the path).
    #[error("{0}")]
    Path(String),
    /// The sandbox could not be created with the requested isolation.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    /// The sandbox is closed.
    #[error("sandbox is closed")]
    Closed,
    /// The caller interrupted the call (it was cancelled inside the sandbox).
    #[error("interrupted")]
    Interrupted,
    /// The sandbox failed while serving a request (init died, protocol error, ...).
    #[error("sandbox error: {0}")]
    Sandbox(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A `Setup` error that carries the last OS error.
    pub fn setup_os(what: &str) -> Self {
        Error::Setup(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

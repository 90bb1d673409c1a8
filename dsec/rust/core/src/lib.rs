//! dsec-core: a namespace sandbox for running untrusted commands and Python code.
//!
//! Layers: [`policy`] (plain data), pure builders ([`seccomp`], [`landlock`], [`mounts`]),
//! the host side ([`host`], [`cgroup`], [`wire`]) and the in-sandbox [`init`].

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod capture;
pub mod cgroup;
pub mod check;
mod error;
pub mod host;
pub mod init;
pub mod landlock;
pub mod mounts;
pub mod policy;
pub mod seccomp;
pub mod snapshot;
pub mod sys;
pub mod wire;

pub use error::{Error, Result};
pub use host::{ExecOutput, ExecRequest, ProcessState, Sandbox};
pub use policy::Policy;

//! Builds the `dsec-init` binary (static, stripped) in a separate target directory under
//! OUT_DIR, so it can be embedded into the extension with `include_bytes!`. A separate target
//! dir avoids the outer build's lock; `--target` keeps the static flags off build scripts.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let rust_dir = manifest.parent().expect("dsec/rust").to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let target = env::var("TARGET").expect("TARGET");
    let target_dir = out.join("init-target");
    for p in ["core/src", "core/Cargo.toml", "init/src", "init/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", rust_dir.join(p).display());
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "-p", "dsec-init", "--target", &target])
        .arg("--manifest-path")
        .arg(rust_dir.join("init/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for v in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(v);
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Ctarget-feature=+crt-static\x1f-Cstrip=symbols",
    );
    let status = cmd.status().expect("run cargo to build dsec-init");
    assert!(status.success(), "building dsec-init failed");
    let bin = target_dir.join(&target).join("release").join("dsec-init");
    assert!(bin.exists(), "dsec-init not found at {}", bin.display());
    println!("cargo:rustc-env=DSEC_INIT_PATH={}", bin.display());
}

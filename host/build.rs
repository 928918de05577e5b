//! Builds the telescope adapters (adapters/, a workspace of its own) for wasm32-wasip2, so
//! that the daemon's tests, bench and `adapter inspect` examples always run against
//! components built from the sources next to them.
//!
//! The adapters get their own target directory (`<target>/adapters`): the outer cargo holds
//! the lock on its own, and sharing it would deadlock. Their paths reach the crate as
//! `STAGED_ADAPTERS_DIR` (the directory holding `adapter_mwa.wasm` and friends).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let adapters = root.join("adapters");
    let wit = root.join("wit");
    println!("cargo:rerun-if-changed={}", wit.display());
    // sqlx::migrate! embeds these; with a build script, cargo only notices what it is told.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("migrations").display()
    );
    for entry in [
        "Cargo.toml",
        "Cargo.lock",
        "common",
        "mwa",
        "filelist",
        "testing",
    ] {
        println!("cargo:rerun-if-changed={}", adapters.join(entry).display());
    }
    println!("cargo:rerun-if-env-changed=STAGED_SKIP_ADAPTER_BUILD");

    let target_dir = outer_target_dir().join("adapters");
    let out = target_dir.join("wasm32-wasip2").join("release");
    println!("cargo:rustc-env=STAGED_ADAPTERS_DIR={}", out.display());
    if env::var_os("STAGED_SKIP_ADAPTER_BUILD").is_some() {
        println!("cargo:warning=STAGED_SKIP_ADAPTER_BUILD is set: adapters not rebuilt");
        return;
    }

    ensure_wasm_target();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(adapters.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&adapters);
    // The outer build's settings describe the host build, not this one: flags, wrappers
    // (clippy's driver), profile overrides and the like must not leak into the guests.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_")
            && !matches!(
                key,
                "CARGO_HOME" | "CARGO_NET_OFFLINE" | "CARGO_HTTP_TIMEOUT"
            )
            || matches!(
                key,
                "RUSTFLAGS" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTDOCFLAGS"
            )
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run cargo to build the adapters: {e}");
    });
    if !status.success() {
        panic!(
            "building the adapters failed (see above). They need the wasm32-wasip2 target: \
             `rustup target add wasm32-wasip2`. By hand: cargo build --release --target \
             wasm32-wasip2 --manifest-path {}",
            adapters.join("Cargo.toml").display()
        );
    }
    for name in [
        "adapter_mwa",
        "adapter_filelist",
        "adapter_hostile",
        "adapter_legacy",
    ] {
        let wasm = out.join(format!("{name}.wasm"));
        assert!(wasm.exists(), "{} was not built", wasm.display());
    }
}

/// Adds the wasm32-wasip2 target through rustup when the toolchain lacks it, so that the
/// README's first command works on a fresh machine. rustup installs the targets that
/// rust-toolchain.toml names only when it installs the toolchain itself; a machine that
/// already has the toolchain (or links it to another) still lacks the target. Without
/// rustup, or when it fails, the build below fails with the command to run by hand.
fn ensure_wasm_target() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return;
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if sysroot.join("lib/rustlib/wasm32-wasip2").is_dir() {
        return;
    }
    println!(
        "cargo:warning=the toolchain lacks the wasm32-wasip2 target: running `rustup target add wasm32-wasip2`"
    );
    // RUSTUP_TOOLCHAIN, set by rustup for this build, makes it the toolchain being built with.
    match Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => println!("cargo:warning=`rustup target add wasm32-wasip2` failed ({s})"),
        Err(e) => println!("cargo:warning=cannot run rustup ({e})"),
    }
}

/// `<target>` of the outer build: OUT_DIR is `<target>[/<triple>]/<profile>/build/<pkg>/out`.
fn outer_target_dir() -> PathBuf {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let build = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.clone());
    // <profile>/build -> <profile> -> its parent is the target dir (or <target>/<triple>).
    let profile_parent = build.parent().and_then(Path::parent).unwrap_or(&build);
    if env::var("TARGET").ok() != env::var("HOST").ok() {
        profile_parent
            .parent()
            .unwrap_or(profile_parent)
            .to_path_buf()
    } else {
        profile_parent.to_path_buf()
    }
}

//! Build the no_std guest (examples/guest) with a nested cargo invocation and hand its ELF path to the crate.
//!
//! The guest needs `panic = "abort"`, a linker script and its own target flags, so it is a separate cargo
//! project. Everything this build script inherits that would leak into that build (RUSTFLAGS, a wrapper set
//! by `cargo clippy`, a forced target or target dir) is removed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");
    for f in ["Cargo.toml", "Cargo.lock", "build.rs", "link.ld", "src"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(f).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("src/abi.rs").display()
    );

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("guest-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
        ])
        .arg(&target_dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "CARGO_PROFILE_RELEASE_OPT_LEVEL",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    // Guest-only flags: a fixed load address, no PIC. `--target` keeps them away from build scripts.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static");
    let status = cmd
        .status()
        .expect("failed to run the nested cargo build of the guest");
    assert!(status.success(), "building the guest (examples/guest) failed");
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/colo-guest");
    println!("cargo:rustc-env=COLO_GUEST_ELF={}", elf.display());
}

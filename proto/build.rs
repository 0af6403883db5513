//! Compiles `proto/fedtiny/v1/*.proto` with `protox` (a protobuf compiler in pure Rust) into a
//! file descriptor set, then generates the prost messages and the tonic service from that set.
//! Nothing here runs `protoc`, so the build needs neither `protoc` nor `PROTOC`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let files = ["fedtiny/v1/fedtiny.proto"];

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", root.display());
    for f in files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }

    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}

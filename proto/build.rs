//! Compiles `fedgate/v1/*.proto` with protox (no system protoc) and writes the descriptor set for reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "fedgate/v1/common.proto",
        "fedgate/v1/audit.proto",
        "fedgate/v1/governance.proto",
        "fedgate/v1/demand.proto",
        "fedgate/v1/federation.proto",
        "fedgate/v1/agency.proto",
        "fedgate/v1/provider.proto",
        "fedgate/v1/open_data.proto",
        "fedgate/v1/console.proto",
        "fedgate/v1/operator.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("fedgate_descriptor.bin"), fds.encode_to_vec())?;
    // Every service and client decodes with the crate's codec: a malformed message is INVALID_ARGUMENT.
    tonic_prost_build::configure()
        .codec_path("crate::codec::ProtoCodec")
        .compile_fds(fds)?;
    Ok(())
}

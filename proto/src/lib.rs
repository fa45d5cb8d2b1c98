//! fedgate's gRPC contract: the `fedgate.v1` package compiled into Rust stubs.
//!
//! The `.proto` files under `proto/fedgate/v1/` are the source of truth; other languages compile them directly.
#![allow(missing_docs, clippy::all)]

pub mod codec;

/// Version 1 of the fedgate API.
pub mod v1 {
    tonic::include_proto!("fedgate.v1");
}

/// Encoded file descriptor set of `fedgate.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fedgate_descriptor");

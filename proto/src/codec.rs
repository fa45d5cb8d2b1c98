//! The protobuf codec of every generated service and client: prost's, except that a message that does not decode
//! is the sender's mistake — INVALID_ARGUMENT, marked so the receiving node can audit it — rather than INTERNAL.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Metadata key set on a status refusing a message that could not be read (a malformed body); a node's edge
/// audits such refusals and removes the key before answering.
pub const MALFORMED_KEY: &str = "fedgate-malformed";

/// A refusal of a message that could not be read, carrying the [`MALFORMED_KEY`] mark.
pub fn malformed(message: impl Into<String>) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(
        MALFORMED_KEY,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    Status::with_metadata(Code::InvalidArgument, message, metadata)
}

/// Whether `status` refuses a message that could not be read (see [`malformed`]).
pub fn is_malformed(status: &Status) -> bool {
    status.metadata().get(MALFORMED_KEY).is_some()
}

/// prost's codec with decode failures answered as [`malformed`].
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder {
            inner: self.inner.decoder(),
        }
    }
}

/// Decodes `U` with prost; a failure is [`malformed`].
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            malformed(format!(
                "the message is not a valid {}: {}",
                short_type_name::<U>(),
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// The last path segment of a Rust type name ("ShareRequest").
fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::ShareRequest;

    #[test]
    fn decode_failures_are_marked_invalid_argument() {
        let s = malformed("x");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(is_malformed(&s));
        assert!(!is_malformed(&Status::invalid_argument("x")));
        assert_eq!(short_type_name::<ShareRequest>(), "ShareRequest");
    }
}

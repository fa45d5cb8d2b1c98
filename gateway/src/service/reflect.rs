//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`) for one listener, listing only the services that
//! listener serves, so that a stock client (grpcurl, grpcui, Postman) sees what it can call there.

use tonic_reflection::server::v1::{ServerReflection as V1, ServerReflectionServer as V1Server};
use tonic_reflection::server::v1alpha::{
    ServerReflection as V1Alpha, ServerReflectionServer as V1AlphaServer,
};

/// The names of both reflection services, which every listener serves.
pub const REFLECTION_SERVICES: [&str; 2] = [
    tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
    tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
];

/// `served` and both reflection services: every service of a listener, as its health service answers for them.
pub fn with_reflection(served: &[&'static str]) -> Vec<&'static str> {
    served.iter().chain(&REFLECTION_SERVICES).copied().collect()
}

/// The health service's name.
pub const HEALTH_SERVICE: &str = tonic_health::pb::health_server::SERVICE_NAME;

/// Reflection v1 and v1alpha listing `served` (fully qualified service names) and both reflection services;
/// the descriptors of fedgate, health and reflection are all known, so each listed service can be described.
pub fn reflection(
    served: &[&str],
) -> Result<(V1Server<impl V1>, V1AlphaServer<impl V1Alpha>), tonic_reflection::server::Error> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(fedgate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        for s in served.iter().chain(&REFLECTION_SERVICES) {
            b = b.with_service_name(*s);
        }
        b
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

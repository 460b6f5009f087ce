//! Compiles `rotsweep.proto` with a vendored protoc, so a fresh machine needs
//! no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=rotsweep.proto");
    // The encoded descriptor set feeds the coordinator's gRPC reflection
    // service (`grpcurl list` and `describe` need no local .proto file).
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("rotsweep_descriptor.bin"))
        .compile_protos(&["rotsweep.proto"], &["."])?;
    Ok(())
}

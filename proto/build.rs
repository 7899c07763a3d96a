//! Generates the gRPC code from `relayfarm/v1/*.proto`. Uses a vendored `protoc` unless
//! `PROTOC` is set, so no system install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("relayfarm_descriptor.bin"))
        .compile_protos(
            &[
                "relayfarm/v1/render.proto",
                "relayfarm/v1/cluster.proto",
                "relayfarm/v1/replica.proto",
                "relayfarm/v1/stage_link.proto",
            ],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=relayfarm");
    Ok(())
}

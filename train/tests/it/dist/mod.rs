//! Data-parallel training: without the `mpi` feature, a process an MPI launcher started
//! refuses to train alone; with it, the MPI tests in [`mpi`].

#[cfg(feature = "mpi")]
mod mpi;

#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_started_by_a_launcher_refuses_to_train_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = crate::write_config(dir.path(), "max_steps = 1\neval_samples = 0");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_graft-train"))
        .arg(&path)
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .expect("spawn graft-train");
    assert!(!out.status.success());
    let err = crate::stderr(&out);
    assert!(
        err.contains("OMPI_COMM_WORLD_SIZE") && err.contains("--features mpi"),
        "{err}"
    );
    assert!(!dir.path().join("runs").exists(), "nothing written");
}

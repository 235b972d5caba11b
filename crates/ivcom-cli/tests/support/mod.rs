//! Helpers shared by the tests of `ivcom run`: the preload library and the C test programs of
//! `tests/preload/`.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `ivcom` binary under test.
pub const IVCOM: &str = env!("CARGO_BIN_EXE_ivcom");
/// Where the C test programs are.
pub const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/preload");

/// The preload library beside the `ivcom` binary, built if this test run did not build it.
pub fn preload_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = Path::new(IVCOM).parent().expect("bin dir").to_path_buf();
        let lib = dir.join("libivcom_preload.so");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "ivcom-preload"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo to build the preload library");
        assert!(st.success(), "building the preload library failed");
        assert!(lib.is_file(), "{} missing after the build", lib.display());
        lib
    })
    .clone()
}

/// `tests/preload/NAME.c`, compiled once per test process into a directory every user can
/// read (the security tests run the programs as other users).
pub fn c_bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ivcom-ctests-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    });
    let out = dir.join(name);
    if !out.exists() {
        // Threads of one test process may compile the same program at once: each writes its
        // own file, and the rename makes one of them the program.
        let tmp = dir.join(format!("{name}.{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        let st = Command::new("cc")
            .args(["-O1", "-Wall", "-Werror", "-pthread", "-o"])
            .arg(&tmp)
            .arg(Path::new(SRC).join(format!("{name}.c")))
            .status()
            .expect("a C compiler (`cc`) is needed for these tests: apt-get install gcc");
        assert!(st.success(), "compiling {name}.c failed");
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

//! Compiles the shims of variadic C functions (stable Rust cannot define one): `src/variadic.c`.
fn main() {
    println!("cargo::rerun-if-changed=src/variadic.c");
    cc::Build::new().file("src/variadic.c").compile("ivcom_variadic");
}

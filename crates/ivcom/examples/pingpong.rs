//! One thread plays both ends of a channel: N round trips of 64 bytes, no waiting involved.
//! Useful to count the instructions of the data path:
//!
//! ```sh
//! cargo build --release -p ivcom --example pingpong
//! valgrind --tool=callgrind target/release/examples/pingpong 10000
//! valgrind --tool=callgrind target/release/examples/pingpong 20000
//! ```
//! The difference of the two totals divided by 10000 is the cost of one round trip
//! (two writes and two reads).

use std::io::{Read, Write};

fn main() -> std::io::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|_| std::io::Error::other(format!("not a count: {a}")))?,
        None => 100_000,
    };
    let dir = std::env::temp_dir().join(format!("ivcom-pingpong-{}", std::process::id()));
    let opts = ivcom::Options::new().runtime_dir(&dir);
    let listener = ivcom::Listener::bind_with("pingpong", &opts)?;
    let server = std::thread::spawn(move || listener.accept());
    let mut client = ivcom::Stream::connect_with("pingpong", &opts)?;
    let mut server = server.join().map_err(|_| std::io::Error::other("accept panicked"))??;
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    for _ in 0..n {
        client.write_all(&msg)?;
        server.read_exact(&mut buf)?;
        server.write_all(&buf)?;
        client.read_exact(&mut buf)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("{n} round trips; client {:?}", client.stats());
    Ok(())
}

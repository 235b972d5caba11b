//! The tokio front end: AsyncRead/AsyncWrite over a channel, split halves in two tasks,
//! end of stream, and readiness that wakes tasks without polling.

use std::time::Duration;

use ivcom::tokio::{AsyncListener, AsyncStream};
use ivcom::Options;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn dir(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ivcom-tokio-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_and_eof() {
    let d = dir("echo");
    let o = Options::new().runtime_dir(&d).capacity(4096);
    let l = AsyncListener::bind("echo", &o).unwrap();
    let server = tokio::spawn(async move {
        let mut s = l.accept().await.unwrap();
        let mut buf = vec![0u8; 1000];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            s.write_all(&buf[..n]).await.unwrap();
        }
        s.shutdown().await.unwrap();
        total
    });
    let c = AsyncStream::connect("echo", &o).await.unwrap();
    let (mut rx, mut tx) = c.into_split();
    // More than the ring holds in flight, so both sides must wait for space and data.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in d2.chunks(777) {
            tx.write_all(chunk).await.unwrap();
        }
        tx.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), rx.read_to_end(&mut got)).await.expect("no hang").unwrap();
    writer.await.unwrap();
    assert_eq!(got, data);
    assert_eq!(server.await.unwrap(), data.len());
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "current_thread")]
async fn a_waiting_task_wakes_when_data_arrives_later() {
    let d = dir("late");
    let o = Options::new().runtime_dir(&d).spin(Duration::ZERO);
    let l = AsyncListener::bind("late", &o).unwrap();
    let server = tokio::spawn(async move { l.accept().await.unwrap() });
    let mut c = AsyncStream::connect("late", &o).await.unwrap();
    let mut s = server.await.unwrap();
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        buf
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"hello").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), reader).await.expect("reader woken").unwrap();
    assert_eq!(&got, b"hello");
    // The peer going away ends the stream.
    drop(s);
    let _ = std::fs::remove_dir_all(&d);
}

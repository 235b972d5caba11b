//! One end of a ring shared by two processes in turn (after `fork`): each adopts the other's
//! published index before using the ring, so bytes are neither overwritten nor read twice;
//! an impossible published index is refused.

use ivcom_ring::layout::{self, Direction, Params};
use ivcom_ring::{HeapRegion, RingError, StreamReader, StreamWriter};

fn setup() -> (HeapRegion, Params) {
    let params = Params { capacity: [4096, 4096], max_message: None };
    let heap = HeapRegion::new(params.region_size().unwrap());
    layout::init(heap.region(), &params).unwrap();
    (heap, params)
}

#[test]
fn writers_and_readers_in_turn_keep_the_stream_whole() {
    let (heap, params) = setup();
    let shm = heap.region();
    let g = params.ring(Direction::ToListener);
    // Two copies of each end, as a fork leaves them.
    let (mut w1, mut w2) = (StreamWriter::new(g), StreamWriter::new(g));
    let (mut r1, mut r2) = (StreamReader::new(g), StreamReader::new(g));
    let mut expect = Vec::new();
    let mut got = Vec::new();
    for round in 0..200u32 {
        let (w, r) = if round % 3 == 0 { (&mut w1, &mut r2) } else { (&mut w2, &mut r1) };
        let c = w.ctrl(shm).unwrap();
        w.state().adopt_published_tail(&c).unwrap();
        let msg: Vec<u8> = (0..(round % 700 + 1)).map(|i| (i as u8) ^ (round as u8)).collect();
        assert_eq!(w.try_write(shm, &msg, &mut || {}).unwrap(), msg.len());
        expect.extend_from_slice(&msg);
        let c = r.ctrl(shm).unwrap();
        r.state().adopt_published_head(&c).unwrap();
        let mut buf = vec![0u8; 1024];
        loop {
            let n = r.try_read(shm, &mut buf, &mut || {}).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(got, expect);
}

#[test]
fn an_impossible_published_index_is_refused() {
    let (heap, params) = setup();
    let shm = heap.region();
    let g = params.ring(Direction::ToListener);
    let mut w = StreamWriter::new(g);
    let c = w.ctrl(shm).unwrap();
    // A tail more than a capacity ahead of the consumer.
    ivcom_ring::Ctrl::store_tail(&c, 5000);
    assert!(matches!(w.state().adopt_published_tail(&c), Err(RingError::Corrupt { .. })));
    assert_eq!(w.state().tail(), 0, "a refused value is not adopted");
    let mut r = StreamReader::new(g);
    let c = r.ctrl(shm).unwrap();
    ivcom_ring::Ctrl::store_tail(&c, 0);
    ivcom_ring::Ctrl::store_head(&c, 10);
    assert!(matches!(r.state().adopt_published_head(&c), Err(RingError::Corrupt { .. })), "head past tail");
    assert_eq!(r.state().head(), 0);
}

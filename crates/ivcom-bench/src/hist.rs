//! Latency histograms: creation, text encoding for the peer protocol, merging.

use anyhow::{anyhow, Context, Result};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;

/// Highest recordable latency: one minute, in nanoseconds.
const MAX_NS: u64 = 60_000_000_000;

/// A new histogram for round-trip times in nanoseconds (3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("static histogram bounds are valid")
}

/// Records `ns`, clamped into the histogram's range.
pub fn record(hist: &mut Histogram<u64>, ns: u64) {
    hist.saturating_record(ns.max(1));
}

/// Serializes with the HdrHistogram V2 format and hex-encodes the bytes.
pub fn encode(hist: &Histogram<u64>) -> Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new().serialize(hist, &mut bytes).map_err(|e| anyhow!("serializing histogram: {e:?}"))?;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    Ok(out)
}

/// Inverse of [`encode`].
pub fn decode(hex: &str) -> Result<Histogram<u64>> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        return Err(anyhow!("odd-length histogram hex"));
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .context("bad histogram hex")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow!("deserializing histogram: {e:?}"))
}

/// Adds all counts of `from` into `into`.
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) -> Result<()> {
    into.add(from).map_err(|e| anyhow!("merging histograms: {e:?}"))
}

/// p50, p99 and p99.9 in nanoseconds, or `None` for an empty histogram.
pub fn percentiles(hist: &Histogram<u64>) -> Option<(u64, u64, u64)> {
    if hist.is_empty() {
        return None;
    }
    Some((hist.value_at_quantile(0.50), hist.value_at_quantile(0.99), hist.value_at_quantile(0.999)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let mut h = new_hist();
        for v in [150, 200, 200, 210, 5_000, 1_000_000] {
            record(&mut h, v);
        }
        let back = decode(&encode(&h).unwrap()).unwrap();
        assert_eq!(back.len(), 6);
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = new_hist();
        let mut b = new_hist();
        for _ in 0..900 {
            record(&mut a, 1_000);
        }
        for _ in 0..100 {
            record(&mut b, 100_000);
        }
        // The merged histogram, as the orchestrator builds it: from decoded rounds.
        let mut total = new_hist();
        merge(&mut total, &decode(&encode(&a).unwrap()).unwrap()).unwrap();
        merge(&mut total, &decode(&encode(&b).unwrap()).unwrap()).unwrap();
        assert_eq!(total.len(), 1_000);
        let (p50, p99, p999) = percentiles(&total).unwrap();
        assert!(total.equivalent(p50, 1_000));
        assert!(total.equivalent(p99, 100_000));
        assert!(total.equivalent(p999, 100_000));
    }

    #[test]
    fn empty_and_clamped() {
        let mut h = new_hist();
        assert!(percentiles(&h).is_none());
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert!(decode("abc").is_err());
        assert!(decode("zz").is_err());
    }
}

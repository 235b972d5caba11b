//! Results: accumulation across rounds, the JSON document and the text table.

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::hist;
use crate::peer::PeerReport;
use crate::plan::{size_label, Cell, Kind, Test};

/// The final figures of one cell, as printed in `--json` (`null` where not applicable).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CellResult {
    pub transport: &'static str,
    pub mode: &'static str,
    pub test: &'static str,
    pub size: usize,
    pub p50_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub p999_ns: Option<u64>,
    pub mb_per_s: Option<f64>,
    pub signals_per_msg: Option<f64>,
    /// Not in the JSON: the kind, for lookups.
    #[serde(skip)]
    pub kind: Kind,
    /// Not in the JSON: slices that produced data.
    #[serde(skip)]
    pub slices: u32,
}

/// The `--json` document.
#[derive(Serialize)]
pub struct JsonReport<'a> {
    /// Busy loops that ran beside the cells (`--load`).
    pub load: u32,
    pub results: &'a [CellResult],
}

/// Serializes the results as the one JSON object printed by `--json`.
pub fn to_json(results: &[CellResult], load: u32) -> Result<String> {
    Ok(serde_json::to_string_pretty(&JsonReport { load, results })?)
}

/// Running totals of one cell over the rounds.
pub struct Accum {
    pub cell: Cell,
    hist: Histogram<u64>,
    bytes: u64,
    elapsed_ns: u64,
    signals: u64,
    messages: u64,
    has_stats: bool,
    pub ok: u32,
    pub failed: u32,
}

impl Accum {
    pub fn new(cell: Cell) -> Accum {
        Accum {
            cell,
            hist: hist::new_hist(),
            bytes: 0,
            elapsed_ns: 0,
            signals: 0,
            messages: 0,
            has_stats: false,
            ok: 0,
            failed: 0,
        }
    }

    /// Adds one slice's reports. Messages are counted at the application level:
    /// two per round trip, one per client write in the stream test.
    /// Fails (adding nothing) if the two sides disagree on what was transferred.
    pub fn add(&mut self, client: &PeerReport, server: &PeerReport) -> Result<()> {
        match self.cell.test {
            Test::Rtt if client.ops != server.ops => {
                bail!("client did {} round trips, server echoed {}", client.ops, server.ops)
            }
            Test::Stream if server.bytes != client.ops * self.cell.size as u64 => bail!(
                "reader got {} bytes, writer wrote {}",
                server.bytes,
                client.ops * self.cell.size as u64
            ),
            _ => {}
        }
        match self.cell.test {
            Test::Rtt => {
                let hex = client.hist_hex.as_deref().context("rtt client sent no histogram")?;
                hist::merge(&mut self.hist, &hist::decode(hex)?)?;
                self.messages += 2 * client.ops;
            }
            Test::Stream => {
                self.bytes += server.bytes;
                self.elapsed_ns += server.elapsed_ns;
                self.messages += client.ops;
            }
        }
        if let (Some(c), Some(s)) = (client.stats, server.stats) {
            self.has_stats = true;
            self.signals += c.signals_sent + s.signals_sent;
        }
        self.ok += 1;
        Ok(())
    }

    pub fn finish(&self) -> CellResult {
        let pct = match self.cell.test {
            Test::Rtt => hist::percentiles(&self.hist),
            Test::Stream => None,
        };
        let mb_per_s = (self.cell.test == Test::Stream && self.elapsed_ns > 0)
            .then(|| mb_per_s(self.bytes, self.elapsed_ns));
        let signals_per_msg = (self.cell.kind.is_ivcom() && self.has_stats && self.messages > 0)
            .then(|| self.signals as f64 / self.messages as f64);
        CellResult {
            transport: self.cell.kind.transport(),
            mode: self.cell.kind.mode(),
            test: self.cell.test.name(),
            size: self.cell.size,
            p50_ns: pct.map(|p| p.0),
            p99_ns: pct.map(|p| p.1),
            p999_ns: pct.map(|p| p.2),
            mb_per_s,
            signals_per_msg,
            kind: self.cell.kind,
            slices: self.ok,
        }
    }
}

/// Megabytes (1e6 bytes) per second.
pub fn mb_per_s(bytes: u64, ns: u64) -> f64 {
    bytes as f64 * 1e3 / ns as f64
}

/// `x` with about three significant digits.
pub fn sig3(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// Nanoseconds as microseconds with about three significant digits.
pub fn fmt_us(ns: u64) -> String {
    sig3(ns as f64 / 1e3)
}

/// How a latency compares to the reference (TCP): `"41.3x lower"`, `"1.20x higher"`.
pub fn latency_ratio(value_ns: u64, reference_ns: u64) -> String {
    if value_ns == 0 || reference_ns == 0 {
        return "-".into();
    }
    if value_ns <= reference_ns {
        format!("{}x lower", ratio_digits(reference_ns as f64 / value_ns as f64))
    } else {
        format!("{}x higher", ratio_digits(value_ns as f64 / reference_ns as f64))
    }
}

/// Throughput relative to the reference (TCP): `"3.42x"`.
pub fn throughput_ratio(value: f64, reference: f64) -> String {
    if !(value > 0.0 && reference > 0.0) {
        return "-".into();
    }
    format!("{}x", ratio_digits(value / reference))
}

fn ratio_digits(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 10.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

/// Share of the copy floor: `"63%"`.
pub fn percent_of(value: f64, floor: f64) -> String {
    if !(value > 0.0 && floor > 0.0) {
        return "-".into();
    }
    format!("{:.0}%", 100.0 * value / floor)
}

fn find<'a>(results: &'a [CellResult], kind: Kind, test: &str, size: usize) -> Option<&'a CellResult> {
    results.iter().find(|r| r.kind == kind && r.test == test && r.size == size)
}

/// Renders rows as an aligned text table (first column left-aligned, the rest right).
fn render(header: &[&str], rows: &[Vec<String>], out: &mut String) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if i < 2 {
                let _ = write!(s, "{cell:<w$}");
            } else {
                let _ = write!(s, "{cell:>w$}");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied(), out);
    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in rows {
        line(&mut row.iter().map(String::as_str), out);
    }
}

/// The human-readable report: a round-trip section and a streaming section.
pub fn table(results: &[CellResult], header_note: &str) -> String {
    let mut out = String::new();
    let dash = || "-".to_owned();
    let rtt: Vec<&CellResult> = results.iter().filter(|r| r.test == "rtt").collect();
    if !rtt.is_empty() {
        let _ = writeln!(out, "Round-trip latency, µs ({header_note})");
        let rows: Vec<Vec<String>> = rtt
            .iter()
            .map(|r| {
                let tcp = find(results, Kind::Tcp, "rtt", r.size).and_then(|t| t.p50_ns);
                let vs = match (r.p50_ns, tcp) {
                    (Some(_), Some(_)) if r.kind == Kind::Tcp => "(reference)".to_owned(),
                    (Some(v), Some(t)) => latency_ratio(v, t),
                    _ => dash(),
                };
                vec![
                    r.transport.to_owned(),
                    r.mode.to_owned(),
                    size_label(r.size),
                    r.p50_ns.map_or_else(dash, fmt_us),
                    r.p99_ns.map_or_else(dash, fmt_us),
                    r.p999_ns.map_or_else(dash, fmt_us),
                    vs,
                    r.signals_per_msg.map_or_else(dash, |s| format!("{s:.3}")),
                ]
            })
            .collect();
        render(
            &["transport", "mode", "size", "p50", "p99", "p99.9", "p50 vs TCP", "signals/msg"],
            &rows,
            &mut out,
        );
    }
    let stream: Vec<&CellResult> = results.iter().filter(|r| r.test == "stream").collect();
    if !stream.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        let _ = writeln!(out, "Streaming throughput, MB/s on the reader side ({header_note})");
        let rows: Vec<Vec<String>> = stream
            .iter()
            .map(|r| {
                let tcp = find(results, Kind::Tcp, "stream", r.size).and_then(|t| t.mb_per_s);
                let floor = find(results, Kind::CopyFloor, "stream", r.size).and_then(|t| t.mb_per_s);
                let vs = match (r.mb_per_s, tcp) {
                    (Some(_), Some(_)) if r.kind == Kind::Tcp => "(reference)".to_owned(),
                    (Some(v), Some(t)) => throughput_ratio(v, t),
                    _ => dash(),
                };
                let of_floor = match (r.mb_per_s, floor) {
                    (Some(v), Some(f)) if r.kind.is_ivcom() => percent_of(v, f),
                    _ => dash(),
                };
                vec![
                    r.transport.to_owned(),
                    r.mode.to_owned(),
                    size_label(r.size),
                    r.mb_per_s.map_or_else(dash, |m| format!("{m:.0}")),
                    vs,
                    r.signals_per_msg.map_or_else(dash, |s| format!("{s:.3}")),
                    of_floor,
                ]
            })
            .collect();
        render(
            &["transport", "mode", "size", "MB/s", "x TCP", "signals/msg", "% copy floor"],
            &rows,
            &mut out,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::StatsRecord;

    fn result(kind: Kind, test: Test, size: usize) -> CellResult {
        Accum::new(Cell { kind, test, size }).finish()
    }

    #[test]
    fn ratio_formatting() {
        assert_eq!(latency_ratio(500, 20_650), "41.3x lower");
        assert_eq!(latency_ratio(20_000, 20_000), "1.00x lower");
        assert_eq!(latency_ratio(24_000, 20_000), "1.20x higher");
        assert_eq!(latency_ratio(100, 25_000), "250x lower");
        assert_eq!(latency_ratio(0, 25_000), "-");
        assert_eq!(throughput_ratio(5404.0 * 3.4, 5404.0), "3.40x");
        assert_eq!(throughput_ratio(12.0 * 25.0, 12.0), "25.0x");
        assert_eq!(throughput_ratio(1.0, 0.0), "-");
        assert_eq!(percent_of(9_000.0, 18_000.0), "50%");
        assert_eq!(fmt_us(213), "0.213");
        assert_eq!(fmt_us(22_040), "22.0");
        assert_eq!(fmt_us(1_234_567), "1235");
        assert_eq!(mb_per_s(2_000_000, 1_000_000_000), 2.0);
    }

    #[test]
    fn json_shape() {
        let mut rtt = Accum::new(Cell { kind: Kind::IvcomAdaptive, test: Test::Rtt, size: 64 });
        let mut h = hist::new_hist();
        hist::record(&mut h, 1_000);
        let client = PeerReport {
            ops: 10,
            hist_hex: Some(hist::encode(&h).unwrap()),
            stats: Some(StatsRecord { signals_sent: 1, ..Default::default() }),
            ..Default::default()
        };
        let server = PeerReport {
            ops: 10,
            stats: Some(StatsRecord { signals_sent: 1, ..Default::default() }),
            ..Default::default()
        };
        rtt.add(&client, &server).unwrap();
        let mut stream = Accum::new(Cell { kind: Kind::Tcp, test: Test::Stream, size: 1024 });
        let reader = PeerReport { bytes: 3_000_320, elapsed_ns: 1_000_000_000, ..Default::default() };
        let writer = PeerReport { ops: 2930, ..Default::default() };
        stream.add(&writer, &reader).unwrap();
        // A reader that lost bytes is an error, not a result.
        let short = PeerReport { bytes: 3_000_000, ..reader.clone() };
        assert!(stream.add(&writer, &short).is_err());
        let results = vec![rtt.finish(), stream.finish()];
        let v: serde_json::Value = serde_json::from_str(&to_json(&results, 0).unwrap()).unwrap();
        let arr = v["results"].as_array().unwrap();
        assert_eq!(v.as_object().unwrap().len(), 2);
        assert_eq!(v["load"], 0);
        assert_eq!(arr.len(), 2);
        let keys = [
            "transport",
            "mode",
            "test",
            "size",
            "p50_ns",
            "p99_ns",
            "p999_ns",
            "mb_per_s",
            "signals_per_msg",
        ];
        for r in arr {
            let o = r.as_object().unwrap();
            assert_eq!(o.len(), keys.len());
            for k in keys {
                assert!(o.contains_key(k), "missing {k}");
            }
        }
        assert_eq!(arr[0]["transport"], "ivcom");
        assert_eq!(arr[0]["mode"], "adaptive");
        assert_eq!(arr[0]["test"], "rtt");
        assert_eq!(arr[0]["size"], 64);
        assert!(arr[0]["p50_ns"].as_u64().unwrap().abs_diff(1_000) < 5);
        assert!(arr[0]["mb_per_s"].is_null());
        assert_eq!(arr[0]["signals_per_msg"], 0.1); // 2 signals / 20 messages
        assert_eq!(arr[1]["transport"], "tcp");
        assert_eq!(arr[1]["mode"], "nodelay");
        assert!(arr[1]["p50_ns"].is_null());
        assert_eq!(arr[1]["mb_per_s"], 3.00032);
        assert!(arr[1]["signals_per_msg"].is_null());
    }

    #[test]
    fn empty_cell_is_all_null() {
        let r = result(Kind::IvcomSleep, Test::Stream, 64);
        assert_eq!(r.mb_per_s, None);
        assert_eq!(r.signals_per_msg, None);
        assert_eq!(r.p50_ns, None);
    }

    #[test]
    fn table_has_ratios() {
        let mut ivcom = result(Kind::IvcomAdaptive, Test::Rtt, 64);
        ivcom.p50_ns = Some(500);
        ivcom.p99_ns = Some(900);
        ivcom.p999_ns = Some(5_000);
        let mut tcp = result(Kind::Tcp, Test::Rtt, 64);
        tcp.p50_ns = Some(20_650);
        tcp.p99_ns = Some(40_000);
        tcp.p999_ns = Some(90_000);
        let mut s_iv = result(Kind::IvcomAdaptive, Test::Stream, 65536);
        s_iv.mb_per_s = Some(9_000.0);
        s_iv.signals_per_msg = Some(0.01);
        let mut s_tcp = result(Kind::Tcp, Test::Stream, 65536);
        s_tcp.mb_per_s = Some(3_000.0);
        let mut s_floor = result(Kind::CopyFloor, Test::Stream, 65536);
        s_floor.mb_per_s = Some(18_000.0);
        let t = table(&[ivcom, tcp, s_iv, s_tcp, s_floor], "test");
        assert!(t.contains("41.3x lower"), "{t}");
        assert!(t.contains("3.00x"), "{t}");
        assert!(t.contains("50%"), "{t}");
        assert!(t.contains("(reference)"), "{t}");
        assert!(t.contains("0.010"), "{t}");
    }
}

//! `--chart out.svg`: latency (p50 by size) and throughput (MB/s by size) per
//! transport, log scales, written as a self-contained SVG by hand.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Result};

use crate::plan::{size_label, Kind, Test};
use crate::report::CellResult;

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 500.0;
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 320.0;
const TOP: f64 = 60.0;
const LEFTS: [f64; 2] = [80.0, 580.0];

/// Fails early (before measuring) if `path` is not a chart we can write.
pub fn check_path(path: &Path) -> Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(()),
        _ => bail!("--chart supports SVG only; use a path ending in .svg"),
    }
}

/// Writes the chart of `results` to `path`.
pub fn write(path: &Path, results: &[CellResult]) -> Result<()> {
    std::fs::write(path, svg(results))?;
    Ok(())
}

fn color(kind: Kind) -> &'static str {
    match kind {
        Kind::IvcomAdaptive => "#d62728",
        Kind::IvcomSleep => "#ff9896",
        Kind::Tcp => "#1f77b4",
        Kind::Uds => "#2ca02c",
        Kind::SpinFloor => "#7f7f7f",
        Kind::CopyFloor => "#404040",
    }
}

fn dashed(kind: Kind) -> bool {
    kind.is_floor()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Decade bounds (as powers of ten) covering all values.
fn decades(values: &[f64]) -> (i32, i32) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !(lo.is_finite() && hi.is_finite() && lo > 0.0) {
        return (0, 1);
    }
    let a = lo.log10().floor() as i32;
    let b = (hi.log10().ceil() as i32).max(a + 1);
    (a, b)
}

fn fmt_tick(exp: i32) -> String {
    let v = 10f64.powi(exp);
    if exp >= 0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

struct Panel<'a> {
    title: &'a str,
    y_label: &'a str,
    test: Test,
    value: fn(&CellResult) -> Option<f64>,
}

fn panel(out: &mut String, left: f64, p: &Panel<'_>, results: &[CellResult]) {
    let sizes = p.test.sizes();
    let points: Vec<(&CellResult, f64)> = results
        .iter()
        .filter(|r| r.test == p.test.name())
        .filter_map(|r| (p.value)(r).filter(|v| *v > 0.0).map(|v| (r, v)))
        .collect();
    let values: Vec<f64> = points.iter().map(|(_, v)| *v).collect();
    let (d0, d1) = decades(&values);
    let x = |i: usize| left + PANEL_W * (i as f64 + 0.5) / sizes.len() as f64;
    let y = |v: f64| TOP + PANEL_H * (1.0 - (v.log10() - f64::from(d0)) / f64::from(d1 - d0));

    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        left + PANEL_W / 2.0,
        TOP - 20.0,
        esc(p.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{left:.1}" y="{TOP:.1}" width="{PANEL_W:.1}" height="{PANEL_H:.1}" fill="none" stroke="#333"/>"##
    );
    for e in d0..=d1 {
        let yy = y(10f64.powi(e));
        let _ = writeln!(
            out,
            r##"<line x1="{left:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="12">{}</text>"##,
            left + PANEL_W,
            left - 6.0,
            yy + 4.0,
            fmt_tick(e)
        );
    }
    for (i, &s) in sizes.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
            x(i),
            TOP + PANEL_H + 18.0,
            size_label(s)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">message size</text>"#,
        left + PANEL_W / 2.0,
        TOP + PANEL_H + 38.0
    );
    let (cx, cy) = (left - 55.0, TOP + PANEL_H / 2.0);
    let _ = writeln!(
        out,
        r#"<text x="{cx:.1}" y="{cy:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 {cx:.1} {cy:.1})">{}</text>"#,
        esc(p.y_label)
    );

    for kind in Kind::ALL {
        let series: Vec<(f64, f64, &CellResult)> = sizes
            .iter()
            .enumerate()
            .filter_map(|(i, &s)| {
                points.iter().find(|(r, _)| r.kind == kind && r.size == s).map(|(r, v)| (x(i), y(*v), *r))
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let c = color(kind);
        if series.len() > 1 {
            let pts: Vec<String> = series.iter().map(|(a, b, _)| format!("{a:.1},{b:.1}")).collect();
            let dash = if dashed(kind) { r#" stroke-dasharray="6 4""# } else { "" };
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
                pts.join(" ")
            );
        }
        for (a, b, r) in &series {
            let v = (p.value)(r).unwrap_or_default();
            let _ = writeln!(
                out,
                r#"<circle cx="{a:.1}" cy="{b:.1}" r="4" fill="{c}"><title>{}/{} {}: {v:.3} {}</title></circle>"#,
                r.transport,
                r.mode,
                size_label(r.size),
                esc(p.y_label)
            );
        }
    }
}

/// The SVG document.
pub fn svg(results: &[CellResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"#
    );
    out.push_str("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let panels = [
        Panel {
            title: "Round-trip latency, p50 (lower is better)",
            y_label: "µs",
            test: Test::Rtt,
            value: |r| r.p50_ns.map(|n| n as f64 / 1e3),
        },
        Panel {
            title: "Streaming throughput (higher is better)",
            y_label: "MB/s",
            test: Test::Stream,
            value: |r| r.mb_per_s,
        },
    ];
    for (p, left) in panels.iter().zip(LEFTS) {
        panel(&mut out, left, p, results);
    }
    // Legend: every kind present in the results.
    let mut lx = LEFTS[0];
    let ly = TOP + PANEL_H + 75.0;
    for kind in Kind::ALL {
        if !results.iter().any(|r| r.kind == kind) {
            continue;
        }
        let c = color(kind);
        let dash = if dashed(kind) { r#" stroke-dasharray="6 4""# } else { "" };
        let label = format!("{}/{}", kind.transport(), kind.mode());
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="3"{dash}/><text x="{:.1}" y="{:.1}" font-size="13">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            esc(&label)
        );
        lx += 40.0 + 7.5 * label.len() as f64;
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Cell;
    use crate::report::Accum;

    #[test]
    fn svg_has_series_and_is_balanced() {
        let mut a = Accum::new(Cell { kind: Kind::Tcp, test: Test::Rtt, size: 64 }).finish();
        a.p50_ns = Some(22_000);
        let mut b = Accum::new(Cell { kind: Kind::IvcomAdaptive, test: Test::Stream, size: 1024 }).finish();
        b.mb_per_s = Some(2_000.0);
        let mut c = Accum::new(Cell { kind: Kind::IvcomAdaptive, test: Test::Stream, size: 65536 }).finish();
        c.mb_per_s = Some(9_000.0);
        let s = svg(&[a, b, c]);
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert!(s.contains("tcp/nodelay"));
        assert!(s.contains("<polyline"));
        assert_eq!(s.matches("<circle").count(), s.matches("</circle>").count());
        assert!(!s.contains("NaN"));
    }

    #[test]
    fn decade_bounds() {
        assert_eq!(decades(&[0.2, 25.0]), (-1, 2));
        assert_eq!(decades(&[10.0]), (1, 2));
        assert_eq!(decades(&[]), (0, 1));
    }

    #[test]
    fn only_svg() {
        assert!(check_path(Path::new("x.svg")).is_ok());
        assert!(check_path(Path::new("x.SVG")).is_ok());
        assert!(check_path(Path::new("x.png")).is_err());
    }
}

//! `training_curves.svg`: the logged loss, NLL, reward accuracy and margin against the step,
//! written at the end of a run so a result can be judged without other tools.

use super::trainer::LogEntry;
use std::fmt::Write;

const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 220.0;
const MARGIN: f64 = 48.0;

/// One curve: legend label, colour, (step, value) points.
type Line<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

struct Series<'a> {
    title: &'a str,
    lines: Vec<Line<'a>>,
}

fn panel(svg: &mut String, x0: f64, y0: f64, s: &Series) {
    let pts = s
        .lines
        .iter()
        .flat_map(|(_, _, p)| p.iter())
        .filter(|p| p.1.is_finite());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if xmin > xmax {
        return;
    }
    if xmax - xmin < 1e-12 {
        xmax = xmin + 1.0;
    }
    if ymax - ymin < 1e-12 {
        ymin -= 0.5;
        ymax += 0.5;
    }
    let (w, h) = (PANEL_W - MARGIN - 12.0, PANEL_H - 2.0 * MARGIN);
    let px = |x: f64| x0 + MARGIN + (x - xmin) / (xmax - xmin) * w;
    let py = |y: f64| y0 + MARGIN + (ymax - y) / (ymax - ymin) * h;
    let _ = write!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" font-size="14" font-weight="bold">{}</text>
<rect x="{:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}" fill="none" stroke="#999"/>
<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{ymax:.4}</text>
<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{ymin:.4}</text>
<text x="{:.1}" y="{:.1}" font-size="11">step {xmin}</text>
<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">step {xmax}</text>
"##,
        x0 + MARGIN,
        y0 + MARGIN - 18.0,
        s.title,
        x0 + MARGIN,
        y0 + MARGIN,
        x0 + MARGIN - 4.0,
        y0 + MARGIN + 10.0,
        x0 + MARGIN - 4.0,
        y0 + MARGIN + h,
        x0 + MARGIN,
        y0 + MARGIN + h + 16.0,
        x0 + MARGIN + w,
        y0 + MARGIN + h + 16.0,
    );
    for (i, (name, color, p)) in s.lines.iter().enumerate() {
        let path: Vec<String> = p
            .iter()
            .filter(|q| q.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>
<text x="{:.1}" y="{:.1}" font-size="11" fill="{color}">{name}</text>"##,
            path.join(" "),
            x0 + MARGIN + 8.0 + 110.0 * i as f64,
            y0 + MARGIN + h + 32.0,
        );
    }
}

/// The SVG document for a run's log (empty log: an empty figure).
pub fn training_curves(log: &[LogEntry]) -> String {
    let series = |f: &dyn Fn(&LogEntry) -> f64| -> Vec<(f64, f64)> {
        log.iter().map(|e| (e.step as f64, f(e))).collect()
    };
    let get = |name: &'static str| move |e: &LogEntry| e.metrics.get(name).unwrap_or(f64::NAN);
    let panels = [
        Series {
            title: "loss",
            lines: vec![
                ("loss", "#1f77b4", series(&|e| e.metrics.loss)),
                ("nll_loss", "#ff7f0e", series(&get("nll_loss"))),
            ],
        },
        Series {
            title: "rewards/accuracies",
            lines: vec![("accuracy", "#2ca02c", series(&get("rewards/accuracies")))],
        },
        Series {
            title: "rewards/margins",
            lines: vec![("margin", "#d62728", series(&get("rewards/margins")))],
        },
        Series {
            title: "log_odds_ratio",
            lines: vec![("log σ(z)", "#9467bd", series(&get("log_odds_ratio")))],
        },
    ];
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{:.0}" height="{:.0}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
"##,
        2.0 * PANEL_W,
        2.0 * PANEL_H
    );
    for (i, s) in panels.iter().enumerate() {
        panel(
            &mut svg,
            (i % 2) as f64 * PANEL_W,
            (i / 2) as f64 * PANEL_H,
            s,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

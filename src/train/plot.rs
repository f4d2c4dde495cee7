//! `training_curves.svg`: the logged loss, NLL, reward accuracy and margin against the step,
//! with the held-out evaluations as dashed lines with dots, written at the end of a run so a
//! result can be judged without other tools.

use super::log::{EvalEntry, LogEntry};
use super::loss::Metrics;
use std::fmt::Write;

const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 220.0;
const MARGIN: f64 = 48.0;

/// One curve: legend label, colour, (step, value) points.
struct Line<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
    /// Held-out evaluations: dashed, each point a dot (there may be only one).
    eval: bool,
}

struct Series<'a> {
    title: &'a str,
    lines: Vec<Line<'a>>,
}

fn panel(svg: &mut String, x0: f64, y0: f64, s: &Series) {
    let pts = s
        .lines
        .iter()
        .flat_map(|l| l.points.iter())
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
    for (i, line) in s.lines.iter().enumerate() {
        let color = line.color;
        let pts: Vec<(f64, f64)> = line
            .points
            .iter()
            .filter(|q| q.1.is_finite())
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let dash = if line.eval {
            r#" stroke-dasharray="5,3""#
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{}"/>
<text x="{:.1}" y="{:.1}" font-size="11" fill="{color}">{}</text>"##,
            path.join(" "),
            x0 + MARGIN + 8.0 + 110.0 * i as f64,
            y0 + MARGIN + h + 32.0,
            line.name,
        );
        if line.eval {
            for (x, y) in pts {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#
                );
            }
        }
    }
}

/// The SVG document for a run's log and evaluations (empty log: an empty figure).
pub fn training_curves(log: &[LogEntry], evals: &[EvalEntry]) -> String {
    let train = |name: &'static str, color: &'static str, metric: &'static str| Line {
        name,
        color,
        points: log
            .iter()
            .map(|e| (e.step as f64, metric_of(&e.metrics, metric)))
            .collect(),
        eval: false,
    };
    let held_out = |name: &'static str, color: &'static str, metric: &'static str| Line {
        name,
        color,
        points: evals
            .iter()
            .map(|e| {
                // eval_loss: the pair-weighted mean, as written to eval_metrics.jsonl.
                let y = match metric {
                    "loss" => e.metrics.loss,
                    _ => metric_of(&e.metrics.metrics, metric),
                };
                (e.step as f64, y)
            })
            .collect(),
        eval: true,
    };
    let panels = [
        Series {
            title: "loss",
            lines: vec![
                train("loss", "#1f77b4", "loss"),
                train("nll_loss", "#ff7f0e", "nll_loss"),
                held_out("eval loss", "#17becf", "loss"),
            ],
        },
        Series {
            title: "rewards/accuracies",
            lines: vec![
                train("accuracy", "#2ca02c", "rewards/accuracies"),
                held_out("eval accuracy", "#8c564b", "rewards/accuracies"),
            ],
        },
        Series {
            title: "rewards/margins",
            lines: vec![
                train("margin", "#d62728", "rewards/margins"),
                held_out("eval margin", "#e377c2", "rewards/margins"),
            ],
        },
        Series {
            title: "log_odds_ratio",
            lines: vec![
                train("log σ(z)", "#9467bd", "log_odds_ratio"),
                held_out("eval log σ(z)", "#7f7f7f", "log_odds_ratio"),
            ],
        },
    ]
    .map(|mut s| {
        s.lines.retain(|l| !l.points.is_empty());
        s
    });
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

/// `loss` or a metric by its TRL name (NaN, not drawn, if unknown).
fn metric_of(m: &Metrics, name: &str) -> f64 {
    match name {
        "loss" => m.loss,
        _ => m.get(name).unwrap_or(f64::NAN),
    }
}

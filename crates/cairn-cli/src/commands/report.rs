//! `cairn report`: a run's history as one self-contained HTML page (inline SVG and CSS,
//! no script, nothing fetched): every checkpoint on a timeline by wall time and step,
//! permanent or temporary, on which tier; the metrics recorded with them as curves; their
//! sizes, the bytes each save wrote, its stall and write time; and, given retention rules,
//! which checkpoints retention keeps and which it deletes next (decided by the library,
//! as `cairn prune --dry-run` decides). Light or dark with the reader's setting.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use cairn::policy::Retention;
use cairn::CheckpointInfo;

use crate::output::{self, CliError};
use crate::CommandResult;

/// What `cairn report` is asked for.
pub struct Report<'a> {
    /// The run (with a two-tier manager, its durable tier).
    pub run: &'a str,
    /// The local tier's run, if any.
    pub local: Option<&'a str>,
    /// Retention rules to show the verdict of (none: no verdict).
    pub retention: Option<Retention>,
    /// The HTML file to write.
    pub out: &'a Path,
}

/// The grace of the dry-run prune that tells retention's verdict: it only lists.
const ALL_YOUNG: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// One checkpoint as the page shows it.
struct Row {
    info: CheckpointInfo,
    tier: &'static str,
    /// Whether retention deletes it next (`None`: no rules given, or not on this tier).
    doomed: Option<bool>,
}

pub fn run(report: Report<'_>) -> CommandResult {
    let mut rows = Vec::new();
    let mut damaged = 0;
    for (tier, uri) in [("durable", Some(report.run)), ("local", report.local)] {
        let Some(uri) = uri else { continue };
        let run = cairn::Run::open(uri)?;
        let survey = run.survey()?;
        for problem in &survey.damaged {
            eprintln!("warning: skipped a damaged checkpoint: {}", output::clean(problem.message()));
        }
        damaged += survey.damaged.len();
        // What retention would delete now: the library's own decision, nothing removed.
        let doomed: Option<BTreeSet<u64>> = match (&report.retention, tier) {
            (Some(retention), "durable") => Some(run.prune(retention, ALL_YOUNG, true)?.deleted.into_iter().collect()),
            _ => None,
        };
        rows.extend(survey.checkpoints.into_iter().map(|info| {
            let doomed = doomed.as_ref().map(|d| d.contains(&info.step));
            Row { info, tier, doomed }
        }));
    }
    rows.sort_by_key(|r| (r.info.step, r.tier));
    let title = match report.local {
        Some(local) => format!("{} (local tier {local})", report.run),
        None => report.run.to_string(),
    };
    let page = page(&title, &rows, report.retention.is_some());
    std::fs::write(report.out, page)
        .map_err(|e| CliError::msg(format!("cannot write report file=`{}`: {e}", report.out.display())))?;
    eprintln!("wrote {} ({} checkpoints)", report.out.display(), rows.len());
    Ok(if damaged == 0 && !rows.is_empty() { ExitCode::SUCCESS } else { super::found_problems() })
}

/// Text made safe inside HTML and SVG (element text and attribute values): markup
/// characters as entities, line breaks kept, other control characters shown escaped.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("&#10;"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
:root { color-scheme: light dark; --fg: #1d2330; --muted: #5b6475; --bg: #ffffff; --panel: #f4f6fa;
  --grid: #d9dee8; --durable: #2f6fdb; --local: #d9822b; --write: #2f9e6a; --doomed: #c0392b; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e9ef; --muted: #9aa3b2; --bg: #14171d; --panel: #1d2129;
  --grid: #343a46; --durable: #6ea0ff; --local: #f0a45d; --write: #53c48f; --doomed: #ff6b5b; } }
body { margin: 0; padding: 24px 32px; font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif;
  color: var(--fg); background: var(--bg); }
h1 { font-size: 20px; margin: 0 0 4px; word-break: break-all; } h2 { font-size: 16px; margin: 28px 0 8px; }
.muted { color: var(--muted); } .panel { background: var(--panel); border-radius: 8px; padding: 12px; }
.facts { display: flex; flex-wrap: wrap; gap: 24px; margin: 12px 0; } .facts b { display: block; font-size: 18px; }
svg { display: block; width: 100%; height: auto; } svg text { fill: var(--muted); font-size: 11px; }
.grid { stroke: var(--grid); stroke-width: 1; } .durable { fill: var(--durable); stroke: var(--durable); }
.local { fill: var(--local); stroke: var(--local); } .temporary { fill: var(--bg); stroke-width: 2; }
.written { fill: var(--write); } .curve { fill: none; stroke: var(--durable); stroke-width: 2; }
.doomed { color: var(--doomed); } .legend span { margin-right: 16px; } .dot { font-size: 16px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 16px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid var(--grid); white-space: nowrap; }
th { color: var(--muted); font-weight: 600; } .wrap { overflow-x: auto; }
";

/// The whole page.
fn page(title: &str, rows: &[Row], with_retention: bool) -> String {
    let mut html = String::new();
    let title = escape(title);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Cairn run {title}</title><style>{STYLE}</style></head><body>\
         <h1>Cairn run <span class=\"muted\">{title}</span></h1>"
    );
    html.push_str(&facts(rows));
    html.push_str("<h2>Checkpoints by wall time and step</h2><div class=\"panel\">");
    html.push_str(
        "<div class=\"legend muted\"><span><span class=\"dot\" style=\"color:var(--durable)\">&#9679;</span> durable</span>\
         <span><span class=\"dot\" style=\"color:var(--local)\">&#9679;</span> local</span>\
         <span>&#9675; temporary</span></div>",
    );
    html.push_str(&timeline(rows));
    html.push_str("</div><div class=\"charts\">");
    html.push_str(&format!(
        "<div><h2>Size and bytes written</h2><div class=\"panel\">{}</div></div>",
        bytes_chart(rows)
    ));
    html.push_str(&format!(
        "<div><h2>Save stall and write time</h2><div class=\"panel\">{}</div></div>",
        time_chart(rows)
    ));
    for (name, points) in metric_series(rows) {
        let chart = curve(&points);
        let _ = write!(html, "<div><h2>{}</h2><div class=\"panel\">{chart}</div></div>", escape(&name));
    }
    html.push_str("</div>");
    html.push_str(&table(rows, with_retention));
    html.push_str("</body></html>\n");
    html
}

fn facts(rows: &[Row]) -> String {
    let permanent = rows.iter().filter(|r| !r.info.temporary).count();
    let logical: u64 = rows.iter().map(|r| r.info.tensor_bytes).sum();
    let written: u64 = rows.iter().map(|r| r.info.written_bytes).sum();
    let span =
        match (rows.iter().map(|r| r.info.created_unix_ms).min(), rows.iter().map(|r| r.info.created_unix_ms).max()) {
            (Some(first), Some(last)) => format!("{} → {}", output::time(first), output::time(last)),
            _ => "no checkpoints".to_string(),
        };
    format!(
        "<div class=\"facts\"><div><b>{}</b><span class=\"muted\">checkpoints ({permanent} permanent)</span></div>\
         <div><b>{}</b><span class=\"muted\">of tensors</span></div><div><b>{}</b><span class=\"muted\">written</span></div>\
         <div><b>{}</b><span class=\"muted\">saved between</span></div></div>",
        rows.len(),
        output::size(logical),
        output::size(written),
        escape(&span),
    )
}

/// Width of the timeline and of the smaller charts, in SVG units (about pixels).
const W: f64 = 960.0;
const SMALL: f64 = 520.0;
const H: f64 = 260.0;
const PAD: f64 = 72.0;

/// Maps `v` in `lo..=hi` onto `a..=b` (the middle when the range is empty).
fn scale(v: f64, (lo, hi): (f64, f64), (a, b): (f64, f64)) -> f64 {
    if hi > lo {
        a + (v - lo) / (hi - lo) * (b - a)
    } else {
        (a + b) / 2.0
    }
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

fn svg_open((width, height): (f64, f64), label: &str) -> String {
    format!("<svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"{}\">", escape(label))
}

/// Axis lines, and labels at both ends of each axis.
fn axes(x: (&str, &str), y: (&str, &str), (width, height): (f64, f64)) -> String {
    let bottom = height - PAD;
    format!(
        "<line class=\"grid\" x1=\"{PAD}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\"/>\
         <line class=\"grid\" x1=\"{PAD}\" y1=\"16\" x2=\"{PAD}\" y2=\"{bottom}\"/>\
         <text x=\"{PAD}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
         <text x=\"{}\" y=\"{bottom}\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"22\" text-anchor=\"end\">{}</text>",
        width - 16.0,
        bottom + 18.0,
        escape(x.0),
        width - 16.0,
        bottom + 18.0,
        escape(x.1),
        PAD - 6.0,
        escape(y.0),
        PAD - 6.0,
        escape(y.1),
    )
}

fn tooltip(row: &Row) -> String {
    let i = &row.info;
    let mut text = format!(
        "step {} ({}, {})\n{}\n{} of tensors, {} written",
        i.step,
        row.tier,
        if i.temporary { "temporary" } else { "permanent" },
        output::time(i.created_unix_ms),
        output::size(i.tensor_bytes),
        output::size(i.written_bytes),
    );
    if let Some(t) = i.timings {
        let _ = write!(text, "\nstall {} write {}", output::seconds(t.snapshot_ms), output::seconds(Some(t.write_ms)));
    }
    let metrics = metrics(i);
    if !metrics.is_empty() {
        let _ = write!(text, "\n{metrics}");
    }
    escape(&text)
}

/// Every checkpoint as a dot: x its creation time, y its step.
fn timeline(rows: &[Row]) -> String {
    let mut svg = svg_open((W, H), "checkpoints by wall time and step");
    let t = range(rows.iter().map(|r| r.info.created_unix_ms as f64));
    let s = range(rows.iter().map(|r| r.info.step as f64));
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let (t0, t1) = (output::time(t.0 as u64), output::time(t.1 as u64));
        svg.push_str(&axes((&t0, &t1), (&first.info.step.to_string(), &last.info.step.to_string()), (W, H)));
    }
    for row in rows {
        let x = scale(row.info.created_unix_ms as f64, t, (PAD + 8.0, W - 24.0));
        let y = scale(row.info.step as f64, s, (H - PAD - 8.0, 24.0));
        let class = format!("{}{}", row.tier, if row.info.temporary { " temporary" } else { "" });
        let _ = write!(
            svg,
            "<circle class=\"ckpt {class}\" data-step=\"{}\" data-tier=\"{}\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"6\"><title>{}</title></circle>",
            row.info.step,
            row.tier,
            tooltip(row)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// One bar per checkpoint: its tensor bytes, and in front the bytes its save wrote.
fn bytes_chart(rows: &[Row]) -> String {
    let size = (SMALL, 220.0);
    let mut svg = svg_open(size, "size and bytes written per checkpoint");
    let top = rows.iter().map(|r| r.info.tensor_bytes.max(r.info.written_bytes)).max().unwrap_or(0) as f64;
    svg.push_str(&axes(("size", "written in front"), ("0", &output::size(top as u64)), size));
    bars(&mut svg, rows, size, top, |r| (r.info.tensor_bytes as f64, r.info.written_bytes as f64));
    svg.push_str("</svg>");
    svg
}

/// One bar per checkpoint: its save's write time, and in front its stall.
fn time_chart(rows: &[Row]) -> String {
    let size = (SMALL, 220.0);
    let mut svg = svg_open(size, "save stall and write time per checkpoint");
    let ms = |r: &Row| r.info.timings.map_or((0.0, 0.0), |t| (t.write_ms as f64, t.snapshot_ms.unwrap_or(0) as f64));
    let top = rows.iter().map(|r| ms(r).0.max(ms(r).1)).fold(0.0, f64::max);
    svg.push_str(&axes(("write", "stall in front"), ("0 s", &format!("{:.2} s", top / 1000.0)), size));
    bars(&mut svg, rows, size, top, ms);
    svg.push_str("</svg>");
    svg
}

/// Draws a wide bar (the tier's colour) and a narrow one in front (green) per row.
fn bars(svg: &mut String, rows: &[Row], (width, height): (f64, f64), top: f64, value: impl Fn(&Row) -> (f64, f64)) {
    let bottom = height - PAD;
    let slot = (width - PAD - 16.0) / rows.len().max(1) as f64;
    for (n, row) in rows.iter().enumerate() {
        let (back, front) = value(row);
        let left = PAD + 4.0 + n as f64 * slot;
        for (v, class, share) in [(back, row.tier, 0.8), (front, "written", 0.4)] {
            let width = (slot * share).max(1.0);
            let x = left + (slot * 0.8 - width) / 2.0;
            let h = scale(v, (0.0, top.max(f64::MIN_POSITIVE)), (0.0, bottom - 24.0));
            let (y, h) = (bottom - h, h);
            let _ = write!(
                svg,
                "<rect class=\"{class}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{width:.1}\" height=\"{h:.1}\"><title>{}</title></rect>",
                tooltip(row)
            );
        }
    }
}

/// Each numeric metric recorded with the checkpoints, by step (at most six metrics).
fn metric_series(rows: &[Row]) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut series: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for row in rows {
        for name in row.info.metrics.keys() {
            if let Some(v) = row.info.metric(name).filter(|v| v.is_finite()) {
                series.entry(name.clone()).or_default().insert(row.info.step, v);
            }
        }
    }
    series.into_iter().take(6).map(|(name, points)| (name, points.into_iter().collect())).collect()
}

/// A metric's curve over the steps.
fn curve(points: &[(u64, f64)]) -> String {
    let (width, height) = (SMALL, 220.0);
    let mut svg = svg_open((width, height), "metric by step");
    let s = range(points.iter().map(|p| p.0 as f64));
    let v = range(points.iter().map(|p| p.1));
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        svg.push_str(&axes(
            (&format!("step {}", first.0), &format!("step {}", last.0)),
            (&number(v.0), &number(v.1)),
            (width, height),
        ));
    }
    let at = |(step, value): (u64, f64)| {
        (scale(step as f64, s, (PAD + 8.0, width - 24.0)), scale(value, v, (height - PAD - 8.0, 24.0)))
    };
    let line: Vec<String> = points.iter().map(|p| at(*p)).map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = write!(svg, "<polyline class=\"curve\" points=\"{}\"/>", line.join(" "));
    for p in points {
        let (x, y) = at(*p);
        let _ = write!(
            svg,
            "<circle class=\"durable\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\"><title>step {}: {}</title></circle>",
            p.0,
            number(p.1)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A metric's value to four significant digits.
fn number(v: f64) -> String {
    let digits = if v == 0.0 { 0 } else { (3 - v.abs().log10().floor() as i32).clamp(0, 12) as usize };
    format!("{v:.digits$}")
}

/// The metrics of a checkpoint, `name=value` with four significant digits.
fn metrics(info: &CheckpointInfo) -> String {
    let pairs = info.metrics.keys().filter_map(|k| info.metric(k).map(|v| format!("{k}={}", number(v))));
    pairs.collect::<Vec<_>>().join(" ")
}

fn table(rows: &[Row], with_retention: bool) -> String {
    let mut html = String::from(
        "<h2>Every checkpoint</h2><div class=\"wrap\"><table><thead><tr><th>step</th><th>tier</th><th>created</th>\
         <th>kind</th><th>size</th><th>written</th><th>stall</th><th>write</th><th>metrics</th><th>retention</th>\
         </tr></thead><tbody>",
    );
    for row in rows {
        let i = &row.info;
        let verdict = match row.doomed {
            Some(true) => "<span class=\"doomed\">deleted next</span>",
            Some(false) => "kept",
            None if with_retention => "—",
            None => "<span class=\"muted\">no rules given</span>",
        };
        let _ = write!(
            html,
            "<tr class=\"row\" data-step=\"{}\" data-tier=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{verdict}</td></tr>",
            i.step,
            row.tier,
            i.step,
            row.tier,
            output::time(i.created_unix_ms),
            if i.temporary { "temporary" } else { "permanent" },
            output::size(i.tensor_bytes),
            output::size(i.written_bytes),
            output::seconds(i.timings.and_then(|t| t.snapshot_ms)),
            output::seconds(i.timings.map(|t| t.write_ms)),
            escape(&metrics(i)),
        );
    }
    html.push_str("</tbody></table></div>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_a_run_cannot_open_an_element() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn line_breaks_stay_and_other_control_characters_show() {
        assert_eq!(escape("a\nb\u{1b}[31m"), "a&#10;b\\u{1b}[31m");
    }

    #[test]
    fn metrics_show_four_significant_digits() {
        assert_eq!(number(0.319362558423387), "0.3194");
        assert_eq!(number(1234.5678), "1235");
        assert_eq!(number(0.00030000000000000003), "0.0003000");
        assert_eq!(number(0.0), "0");
    }

    #[test]
    fn scales_map_ranges_and_empty_ranges_to_the_middle() {
        assert_eq!(scale(5.0, (0.0, 10.0), (0.0, 100.0)), 50.0);
        assert_eq!(scale(3.0, (3.0, 3.0), (0.0, 100.0)), 50.0);
    }
}

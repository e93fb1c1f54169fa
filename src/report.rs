//! Run reports, the library side of `anemone plot` and `anemone runs`: read a
//! run directory's metrics log, draw it, and summarize every run in a folder.
//!
//! A run directory holds [`METRICS_FILE`] (one JSON object per line, see
//! [`MetricRow`]), [`CONFIG_FILE`] (any JSON object; [`RunSummary`] says which
//! fields are shown) and maybe [`CHECKPOINT_FILE`]. This module only reads them;
//! the training loop writes them.
//!
//! Plots are drawn with `plotters` (PNG or SVG, chosen by the file extension).
//! Text in a PNG needs a font: the crate embeds `assets/fonts/DejaVuSans-subset.ttf`,
//! printable ASCII cut from DejaVu Sans (Bitstream Vera license, public-domain
//! DejaVu changes; 20 KB instead of 750 KB; made by `scripts/subset_font.py`) and
//! renders it with plotters' pure-Rust `ab_glyph` feature, so plotting needs no
//! system font library (no fontconfig, no FreeType) on Linux or macOS. Titles and
//! labels are therefore ASCII.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The metrics log of a run directory: one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The model and training configuration of a run directory.
pub const CONFIG_FILE: &str = "config.json";
/// The checkpoint of a run directory, if one was saved.
pub const CHECKPOINT_FILE: &str = "checkpoint.bin";
/// Width and height of a plot, in pixels.
pub const PLOT_SIZE: (u32, u32) = (1000, 1100);

/// Color of the training-loss line.
pub const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
/// Color of the held-out-loss line and points.
pub const VAL_COLOR: RGBColor = RGBColor(230, 110, 10);
/// Color of the learning-rate and throughput lines.
pub const OTHER_COLOR: RGBColor = RGBColor(40, 140, 60);

const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-subset.ttf");

/// One line of `metrics.jsonl`. Only `step` is required; unknown fields are
/// ignored so the training loop can log more without breaking old readers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    pub step: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f32>,
    /// Loss on held-out data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f32>,
    /// Seconds since the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
}

/// The rows of `run_dir/metrics.jsonl`. Empty lines are skipped. A last line
/// without its newline that does not parse is taken as being written right now
/// (training still running) and skipped; any other bad line is an error naming
/// the file and the line.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<MetricRow>> {
    let path = run_dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    parse_metrics(&path, &text)
}

fn parse_metrics(path: &Path, text: &str) -> Result<Vec<MetricRow>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rows = Vec::with_capacity(lines.len());
    for (line_idx, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<MetricRow>(line) {
            Ok(row) => rows.push(row),
            Err(_) if line_idx + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => {
                // serde_json appends " at line 1 column N": keep the column only.
                let message = e.to_string();
                let message = message.rsplit_once(" at line ").map_or(&*message, |m| m.0);
                return Err(Error::format(
                    path,
                    format!("line {}", line_idx + 1),
                    format!(
                        "column {}: {message}; each line must be one JSON object with an integer \
                         `step` and optional numbers train_loss, val_loss, lr, tokens_per_s, elapsed_s",
                        e.column()
                    ),
                ));
            }
        }
    }
    Ok(rows)
}

/// What `anemone runs` shows about one run directory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSummary {
    /// The directory's name.
    pub name: String,
    pub path: PathBuf,
    /// `preset` of `config.json`, if present.
    pub preset: Option<String>,
    /// `model.dim` of `config.json`.
    pub dim: Option<u64>,
    /// `model.n_layers` of `config.json`.
    pub n_layers: Option<u64>,
    /// Planned steps: `steps` of `config.json` (or `train.steps`).
    pub steps: Option<u64>,
    /// The largest step in the metrics log.
    pub last_step: Option<u64>,
    /// The lowest finite held-out loss and the step it was measured at.
    pub best_val_loss: Option<(u64, f32)>,
    pub has_checkpoint: bool,
    /// Why part of the summary is missing (unreadable config or metrics).
    pub problem: Option<String>,
}

/// Summarize one run directory. Never fails: what cannot be read is reported in
/// [`RunSummary::problem`] and the rest is still filled in.
pub fn summarize_run(run_dir: &Path) -> RunSummary {
    let mut summary = RunSummary {
        name: run_dir.file_name().map_or_else(
            || run_dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        path: run_dir.to_path_buf(),
        has_checkpoint: run_dir.join(CHECKPOINT_FILE).is_file(),
        ..RunSummary::default()
    };
    let mut problems = Vec::new();
    let config_path = run_dir.join(CONFIG_FILE);
    if config_path.is_file() {
        match read_config(&config_path) {
            Ok(config) => {
                summary.preset = config["preset"].as_str().map(str::to_string);
                summary.dim = config["model"]["dim"].as_u64();
                summary.n_layers = config["model"]["n_layers"].as_u64();
                summary.steps = config["steps"]
                    .as_u64()
                    .or_else(|| config["train"]["steps"].as_u64());
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if run_dir.join(METRICS_FILE).is_file() {
        match read_metrics(run_dir) {
            Ok(rows) => {
                summary.last_step = rows.iter().map(|r| r.step).max();
                summary.best_val_loss = best_val_loss(&rows);
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        summary.problem = Some(problems.join("; "));
    }
    summary
}

fn read_config(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, "json", format!("{e}; expected one JSON object")))?;
    if !config.is_object() {
        return Err(Error::format(path, "json", "expected a JSON object"));
    }
    Ok(config)
}

fn best_val_loss(rows: &[MetricRow]) -> Option<(u64, f32)> {
    rows.iter()
        .filter_map(|r| r.val_loss.filter(|v| v.is_finite()).map(|v| (r.step, v)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

/// Summaries of the run directories directly under `parent` (those holding a
/// `metrics.jsonl` or a `config.json`), sorted by name.
pub fn list_runs(parent: &Path) -> Result<Vec<RunSummary>> {
    let entries = std::fs::read_dir(parent).map_err(|e| Error::io(parent, e))?;
    let mut runs = Vec::new();
    for entry in entries {
        let dir = entry.map_err(|e| Error::io(parent, e))?.path();
        if dir.join(METRICS_FILE).is_file() || dir.join(CONFIG_FILE).is_file() {
            runs.push(summarize_run(&dir));
        }
    }
    runs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(runs)
}

/// The runs as an aligned text table (one header line, one line per run, and a
/// `! name: problem` line after the table for each run with a problem).
pub fn format_runs(runs: &[RunSummary]) -> String {
    fn or_dash<T: ToString>(value: Option<T>) -> String {
        value.map_or_else(|| "-".to_string(), |v| v.to_string())
    }
    let header = [
        "run",
        "preset",
        "dim",
        "layers",
        "step",
        "best held-out",
        "checkpoint",
    ];
    let table: Vec<[String; 7]> = runs
        .iter()
        .map(|run| {
            [
                run.name.clone(),
                or_dash(run.preset.as_deref()),
                or_dash(run.dim),
                or_dash(run.n_layers),
                format!("{}/{}", or_dash(run.last_step), or_dash(run.steps)),
                run.best_val_loss
                    .map_or_else(|| "-".into(), |(step, loss)| format!("{loss:.4} @ {step}")),
                (if run.has_checkpoint { "yes" } else { "no" }).into(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &table {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let header = header.map(str::to_string);
    for row in std::iter::once(&header).chain(&table) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for run in runs {
        if let Some(problem) = &run.problem {
            out.push_str(&format!("! {}: {problem}\n", run.name));
        }
    }
    out
}

/// Draw the metrics of `run_dir` to `out_path` (`.png` or `.svg`, [`PLOT_SIZE`]):
/// three panels against the step, loss (train and held-out, log scale),
/// learning rate, and throughput in tokens/s.
pub fn plot(run_dir: &Path, out_path: &Path) -> Result<()> {
    let extension = out_path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if !matches!(extension.as_deref(), Some("png" | "svg")) {
        return Err(Error::Invalid(format!(
            "{}: cannot tell the picture format; name the file *.png or *.svg",
            out_path.display()
        )));
    }
    let rows = read_metrics(run_dir)?;
    if rows.is_empty() {
        return Err(Error::format(
            run_dir.join(METRICS_FILE),
            "rows",
            "no metrics yet; plot again after the first logged step",
        ));
    }
    register_font();
    let title = plot_title(run_dir, &rows);
    let failed = |e: String| Error::io(out_path, std::io::Error::other(format!("plot: {e}")));
    if extension.as_deref() == Some("png") {
        let root = BitMapBackend::new(out_path, PLOT_SIZE).into_drawing_area();
        draw_panels(&root, &title, &rows).map_err(|e| failed(e.to_string()))?;
        root.present().map_err(|e| failed(e.to_string()))?;
    } else {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
            draw_panels(&root, &title, &rows).map_err(|e| failed(e.to_string()))?;
            root.present().map_err(|e| failed(e.to_string()))?;
        }
        crate::atomic::write_atomic(out_path, svg.as_bytes())?;
    }
    Ok(())
}

/// Make the embedded font the "sans-serif" family of plotters (once per process).
fn register_font() {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_err() {
            panic!(
                "the embedded font assets/fonts/DejaVuSans-subset.ttf is not a valid TrueType font"
            );
        }
    });
}

fn plot_title(run_dir: &Path, rows: &[MetricRow]) -> String {
    let name = run_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| run_dir.display().to_string());
    let last_step = rows.iter().map(|r| r.step).max().unwrap_or(0);
    let mut title = format!("{name}: step {last_step}");
    if let Some((step, loss)) = best_val_loss(rows) {
        title.push_str(&format!(", best held-out loss {loss:.4} at step {step}"));
    }
    if let Some(elapsed) = rows.iter().rev().find_map(|r| r.elapsed_s) {
        title.push_str(&format!(", {elapsed:.0} s"));
    }
    title
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    rows: &[MetricRow],
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let body = root.margin(6, 0, 0, 0).titled(title, (FONT, 24))?;
    let panels = body.split_evenly((3, 1));
    let max_step = rows.iter().map(|r| r.step).max().unwrap_or(0).max(1) as f64;
    let points = |field: fn(&MetricRow) -> Option<f32>| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| field(r).map(|v| (r.step as f64, f64::from(v))))
            .filter(|(_, v)| v.is_finite())
            .collect()
    };
    loss_panel(
        &panels[0],
        points(|r| r.train_loss),
        points(|r| r.val_loss),
        max_step,
    )?;
    linear_panel(
        &panels[1],
        "learning rate",
        "lr",
        &points(|r| r.lr),
        max_step,
    )?;
    linear_panel(
        &panels[2],
        "throughput",
        "tokens/s",
        &points(|r| r.tokens_per_s),
        max_step,
    )
}

fn step_label(step: &f64) -> String {
    format!("{}", step.round() as i64)
}

/// A number with about three significant digits: 0.000300 -> "3.0e-4", 2.5 -> "2.5".
fn short_number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude == 0.0 {
        "0".into()
    } else if !(0.01..100_000.0).contains(&magnitude) {
        format!("{value:.1e}")
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A log-scale loss axis with ticks at round values (plotters' own log range puts
/// ticks at powers of ten only, which leaves a 1.5..10 loss axis with one label).
struct LogAxis {
    lo: f64,
    hi: f64,
}

impl LogAxis {
    /// Round values between `lo` and `hi`: `bold` ones get a label, the others a
    /// light grid line.
    fn ticks(&self, bold: bool) -> Vec<f64> {
        let ratio = self.hi / self.lo;
        if ratio < 3.0 {
            // Nearly linear over so short a range: evenly spaced round values.
            if !bold {
                return Vec::new();
            }
            let step = nice_step((self.hi - self.lo) / 8.0);
            let first = (self.lo / step).ceil() as i64;
            let last = (self.hi / step).floor() as i64;
            return (first..=last).map(|k| k as f64 * step).collect();
        }
        let labelled: &[f64] = if ratio < 30.0 {
            &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
        } else {
            &[1.0, 2.0, 5.0]
        };
        let candidates: Vec<f64> = if bold {
            labelled.to_vec()
        } else {
            (1..10)
                .map(f64::from)
                .filter(|m| !labelled.contains(m))
                .collect()
        };
        let mut ticks = Vec::new();
        for decade in (self.lo.log10().floor() as i32)..=(self.hi.log10().ceil() as i32) {
            for mantissa in &candidates {
                let value = mantissa * 10f64.powi(decade);
                if (self.lo..=self.hi).contains(&value) {
                    ticks.push(value);
                }
            }
        }
        ticks
    }
}

/// The smallest of 1, 2, 5 times a power of ten that is at least `rough`.
fn nice_step(rough: f64) -> f64 {
    let power = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= rough)
        .unwrap_or(10.0 * power)
}

impl Ranged for LogAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let (lo, hi) = (self.lo.log10(), self.hi.log10());
        let fraction = (value.max(f64::MIN_POSITIVE).log10() - lo) / (hi - lo);
        limit.0 + (fraction * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        self.ticks(!hint.weight().allow_light_points())
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

impl ValueFormatter<f64> for LogAxis {
    fn format(value: &f64) -> String {
        short_number(*value)
    }
}

fn loss_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    train: Vec<(f64, f64)>,
    val: Vec<(f64, f64)>,
    max_step: f64,
) -> DrawResult<DB> {
    let caption = "loss (log scale)";
    // Log scale: only positive losses can be drawn.
    let positive = |points: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        points.into_iter().filter(|(_, v)| *v > 0.0).collect()
    };
    let (train, val) = (positive(train), positive(val));
    if train.is_empty() && val.is_empty() {
        return empty_panel(area, caption, "no train_loss or val_loss values");
    }
    let values = || train.iter().chain(&val).map(|(_, v)| *v);
    let lo = values().fold(f64::INFINITY, f64::min);
    let hi = values().fold(0.0, f64::max);
    // Pad by 4% of the span in log space (at least 1% of the value).
    let pad = ((hi / lo).ln() * 0.04).max(0.01).exp();
    let axis = LogAxis {
        lo: lo / pad,
        hi: hi * pad,
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin(12)
        .margin_right(32)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..max_step, axis)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .x_label_formatter(&step_label)
        .draw()?;
    let has_val = !val.is_empty();
    if !train.is_empty() {
        chart
            .draw_series(LineSeries::new(train, TRAIN_COLOR.stroke_width(2)))?
            .label("train")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], TRAIN_COLOR.stroke_width(3)));
    }
    if has_val {
        chart
            .draw_series(LineSeries::new(val, VAL_COLOR.stroke_width(2)).point_size(3))?
            .label("held-out")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], VAL_COLOR.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

fn linear_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    field: &str,
    points: &[(f64, f64)],
    max_step: f64,
) -> DrawResult<DB> {
    if points.is_empty() {
        return empty_panel(area, caption, &format!("no {field} values"));
    }
    let lo = points.iter().map(|p| p.1).fold(0.0, f64::min);
    let hi = points.iter().map(|p| p.1).fold(0.0, f64::max);
    let hi = if hi > lo {
        hi + (hi - lo) * 0.08
    } else {
        lo + 1.0
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin(12)
        .margin_right(32)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..max_step, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(field)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .x_label_formatter(&step_label)
        .y_label_formatter(&|v| short_number(*v))
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        OTHER_COLOR.stroke_width(2),
    ))?;
    Ok(())
}

fn empty_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    message: &str,
) -> DrawResult<DB> {
    let inner = area.titled(caption, (FONT, 20))?;
    let (width, height) = inner.dim_in_pixel();
    let gray = BLACK.mix(0.6);
    let style = TextStyle::from((FONT, 16).into_font())
        .color(&gray)
        .pos(Pos::new(HPos::Center, VPos::Center));
    inner.draw(&Text::new(
        message.to_string(),
        (width as i32 / 2, height as i32 / 2),
        style,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers() {
        assert_eq!(short_number(3e-4), "3.0e-4");
        assert_eq!(short_number(2.5), "2.5");
        assert_eq!(short_number(10.0), "10");
        assert_eq!(short_number(1234.4), "1234");
        assert_eq!(short_number(0.0), "0");
    }

    #[test]
    fn log_axis_ticks_are_round_values_inside_the_range() {
        let narrow = LogAxis { lo: 1.7, hi: 10.4 };
        assert_eq!(
            narrow.ticks(true),
            [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0]
        );
        assert_eq!(narrow.ticks(false), [9.0]);
        let wide = LogAxis { lo: 0.05, hi: 20.0 };
        let round = |ticks: Vec<f64>| -> Vec<f64> {
            ticks.iter().map(|t| (t * 1e6).round() / 1e6).collect()
        };
        assert_eq!(
            round(wide.ticks(true)),
            [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
        );
        let close = LogAxis {
            lo: 9.05,
            hi: 10.45,
        };
        assert_eq!(
            round(close.ticks(true)),
            [9.2, 9.4, 9.6, 9.8, 10.0, 10.2, 10.4]
        );
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(0.02), 0.02);
        // Equal ratios take equal distances: 1 -> 10 is half of 0.1 -> 10.
        let axis = LogAxis { lo: 0.1, hi: 10.0 };
        assert_eq!(axis.map(&0.1, (0, 200)), 0);
        assert_eq!(axis.map(&1.0, (0, 200)), 100);
        assert_eq!(axis.map(&10.0, (0, 200)), 200);
    }

    #[test]
    fn embedded_font_registers_once_and_measures_text() {
        register_font();
        register_font();
        // An unregistered family has no glyphs to measure: these sizes come
        // from the embedded font, proportional (W is wider than i).
        let font = (FONT, 16).into_font();
        let (wide, height) = font.box_size("WWWW").unwrap();
        let (narrow, _) = font.box_size("iiii").unwrap();
        assert!(
            height > 0 && narrow > 0 && wide > narrow,
            "{wide} {narrow} {height}"
        );
    }
}

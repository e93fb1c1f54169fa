//! Run reports on synthetic run directories: metrics parsing and its errors,
//! plots (decoded and inspected pixel by pixel), run listings.

use std::path::Path;

use anemone::report::{
    self, MetricRow, OTHER_COLOR, PLOT_SIZE, TRAIN_COLOR, VAL_COLOR, format_runs, list_runs, plot,
    read_metrics,
};

use crate::common::temp_dir;

/// A run of 300 steps: exponentially decaying train loss, held-out loss every
/// 25 steps, linear warmup then linear decay of lr, steady throughput.
fn write_synthetic_run(dir: &Path, with_val: bool) {
    let mut lines = String::new();
    for step in 0..=300u64 {
        let t = step as f64;
        let train = 2.0 + 8.0 * (-t / 60.0).exp();
        let lr = if step < 30 {
            3e-4 * t / 30.0
        } else {
            3e-4 * (300.0 - t) / 270.0
        };
        let tokens_per_s = 5000.0 + 300.0 * (t / 7.0).sin();
        let mut line = format!(
            r#"{{"step":{step},"train_loss":{train},"lr":{lr},"tokens_per_s":{tokens_per_s},"elapsed_s":{}"#,
            t * 0.5
        );
        if with_val && step % 25 == 0 {
            line.push_str(&format!(r#","val_loss":{}"#, train + 0.2));
        }
        line.push_str("}\n");
        lines.push_str(&line);
    }
    std::fs::write(dir.join(report::METRICS_FILE), lines).unwrap();
}

fn decode_png(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "plotters writes RGB");
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(3)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width, info.height, pixels)
}

fn count(pixels: &[[u8; 3]], color: plotters::style::RGBColor) -> usize {
    pixels
        .iter()
        .filter(|p| **p == [color.0, color.1, color.2])
        .count()
}

#[test]
fn plot_png_has_the_size_lines_and_text() {
    let dir = temp_dir("report-png");
    write_synthetic_run(&dir, true);
    let out = dir.join("plot.png");
    plot(&dir, &out).unwrap();
    let (width, height, pixels) = decode_png(&out);
    assert_eq!((width, height), PLOT_SIZE);
    let non_white = pixels.iter().filter(|p| **p != [255, 255, 255]).count();
    assert!(non_white > pixels.len() / 50, "{non_white} drawn pixels");
    // Each series is drawn in its own color.
    assert!(count(&pixels, TRAIN_COLOR) > 500, "train line");
    assert!(count(&pixels, VAL_COLOR) > 200, "held-out line");
    assert!(count(&pixels, OTHER_COLOR) > 1000, "lr and tokens/s lines");
    // The title (top 40 rows) has dark, anti-aliased glyph pixels: the font works.
    let title = &pixels[..40 * width as usize];
    let dark = title.iter().filter(|p| p.iter().all(|&c| c < 100)).count();
    let gray = title
        .iter()
        .filter(|p| p.iter().all(|&c| (100..230).contains(&c)))
        .count();
    assert!(
        dark > 200 && gray > 50,
        "title text: {dark} dark, {gray} gray"
    );

    // Without held-out losses, nothing is drawn in the held-out color.
    let dir_no_val = temp_dir("report-png-no-val");
    write_synthetic_run(&dir_no_val, false);
    let out = dir_no_val.join("plot.png");
    plot(&dir_no_val, &out).unwrap();
    let (_, _, pixels) = decode_png(&out);
    assert_eq!(count(&pixels, VAL_COLOR), 0);
    assert!(count(&pixels, TRAIN_COLOR) > 500);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir_no_val).unwrap();
}

#[test]
fn plot_svg_and_unknown_extension() {
    let dir = temp_dir("report-svg");
    write_synthetic_run(&dir, true);
    let out = dir.join("plot.svg");
    plot(&dir, &out).unwrap();
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains(r#"width="1000""#),
        "{}",
        &svg[..100]
    );
    for text in [
        "loss (log scale)",
        "learning rate",
        "throughput",
        "held-out",
        "train",
        "step",
    ] {
        assert!(
            svg.lines().any(|l| l.trim() == text),
            "missing text {text:?}"
        );
    }
    let err = plot(&dir, &dir.join("plot.jpg")).unwrap_err().to_string();
    assert!(err.contains("plot.jpg") && err.contains(".png"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn read_metrics_parses_rows_and_optional_fields() {
    let dir = temp_dir("report-parse");
    let text = "{\"step\":0,\"train_loss\":10.5,\"lr\":0.0}\n\
                \n\
                {\"step\":10,\"val_loss\":3.25,\"tokens_per_s\":1200.5,\"elapsed_s\":4.5,\"grad_norm\":1.0}\n";
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    let rows = read_metrics(&dir).unwrap();
    assert_eq!(
        rows,
        [
            MetricRow {
                step: 0,
                train_loss: Some(10.5),
                lr: Some(0.0),
                ..MetricRow::default()
            },
            MetricRow {
                step: 10,
                val_loss: Some(3.25),
                tokens_per_s: Some(1200.5),
                elapsed_s: Some(4.5),
                ..MetricRow::default()
            },
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn read_metrics_names_the_file_and_line_of_a_bad_row() {
    let dir = temp_dir("report-bad");
    let path = dir.join("metrics.jsonl");
    let good = "{\"step\":1,\"train_loss\":5.0}\n";

    std::fs::write(
        &path,
        format!("{good}{good}{{\"step\":2,\"train_loss\":}}\n{good}"),
    )
    .unwrap();
    let err = read_metrics(&dir).unwrap_err().to_string();
    assert!(
        err.contains("metrics.jsonl") && err.contains("line 3"),
        "{err}"
    );

    std::fs::write(&path, format!("{good}{{\"train_loss\":1.0}}\n")).unwrap();
    let err = read_metrics(&dir).unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("step"), "{err}");

    // A torn last line (no newline yet: the run is writing it) is skipped ...
    std::fs::write(&path, format!("{good}{good}{{\"step\":3,\"tra")).unwrap();
    assert_eq!(read_metrics(&dir).unwrap().len(), 2);
    // ... but not a complete bad last line.
    std::fs::write(&path, format!("{good}{{\"step\":3,\"tra\n")).unwrap();
    assert!(read_metrics(&dir).is_err());

    let missing = dir.join("nothing-here");
    let err = read_metrics(&missing).unwrap_err().to_string();
    assert!(err.contains("nothing-here/metrics.jsonl"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn list_runs_summarizes_config_and_metrics() {
    let parent = temp_dir("report-runs");
    let run_a = parent.join("a-tiny");
    let run_b = parent.join("b-broken");
    std::fs::create_dir_all(&run_a).unwrap();
    std::fs::create_dir_all(&run_b).unwrap();
    std::fs::create_dir_all(parent.join("not-a-run")).unwrap();
    std::fs::write(parent.join("notes.txt"), "x").unwrap();

    std::fs::write(
        run_a.join("config.json"),
        r#"{"preset":"tiny","steps":500,"model":{"dim":64,"n_layers":2,"vocab_size":512}}"#,
    )
    .unwrap();
    std::fs::write(
        run_a.join("metrics.jsonl"),
        "{\"step\":0,\"val_loss\":6.0}\n{\"step\":20,\"val_loss\":2.5}\n\
         {\"step\":40,\"val_loss\":2.75}\n{\"step\":50,\"train_loss\":2.0}\n",
    )
    .unwrap();
    std::fs::write(run_a.join("checkpoint.bin"), b"x").unwrap();
    std::fs::write(run_b.join("config.json"), "[1, 2]").unwrap();
    std::fs::write(run_b.join("metrics.jsonl"), "{\"step\":7}\nnot json\n").unwrap();

    let runs = list_runs(&parent).unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a-tiny", "b-broken"]);
    let a = &runs[0];
    assert_eq!(a.preset.as_deref(), Some("tiny"));
    assert_eq!((a.dim, a.n_layers, a.steps), (Some(64), Some(2), Some(500)));
    assert_eq!(a.last_step, Some(50));
    assert_eq!(a.best_val_loss, Some((20, 2.5)));
    assert!(a.has_checkpoint && a.problem.is_none());
    let b = &runs[1];
    assert!(!b.has_checkpoint && b.last_step.is_none() && b.dim.is_none());
    let problem = b.problem.as_deref().unwrap();
    assert!(
        problem.contains("config.json") && problem.contains("line 2"),
        "{problem}"
    );

    let table = format_runs(&runs);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("run ") && lines[0].contains("best held-out"));
    for cell in ["a-tiny", "tiny", "64", "50/500", "2.5000 @ 20", "yes"] {
        assert!(lines[1].contains(cell), "{cell:?} in {:?}", lines[1]);
    }
    assert!(lines[3].starts_with("! b-broken: "), "{table}");
    std::fs::remove_dir_all(&parent).unwrap();
}

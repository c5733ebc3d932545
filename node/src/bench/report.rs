//! Writing a [`PaperReport`](super::PaperReport): report.md, report.json, loss.png.
//!
//! The plot is drawn with `plotters` and no system library: text goes through
//! its `ab_glyph` renderer, with a TTF font found on disk at run time (see
//! [`FONT_PATHS`]). Without a font the chart is still drawn, with no text.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::PaperReport;

/// Size of loss.png, in pixels.
pub const PLOT_SIZE: (u32, u32) = (900, 500);

/// The MixNN paper.
const PAPER: &str = "MixNN paper (arXiv 2203.14803)";

/// The font family name the plot's text uses; registered at run time.
const FONT_FAMILY: &str = "mixnn-report-sans";

/// Environment variable naming a TTF/OTF font file to use for the plot's text.
pub const FONT_ENV: &str = "MIXNN_PLOT_FONT";

/// Where to look for a font for the plot's text, in order (after [`FONT_ENV`]).
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/google-noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The files [`write_report`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportFiles {
    pub markdown: PathBuf,
    pub json: PathBuf,
    pub plot: PathBuf,
}

/// Why [`write_report`] failed, naming the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot create report directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode {} as JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot draw {}: {message}", path.display())]
    Plot { path: PathBuf, message: String },
}

/// Write `out/report.md`, `out/report.json` and `out/loss.png`, creating `out` if needed.
pub fn write_report(report: &PaperReport, out: &Path) -> Result<ReportFiles, ReportError> {
    fs::create_dir_all(out).map_err(|source| ReportError::CreateDir {
        path: out.to_path_buf(),
        source,
    })?;
    let files = ReportFiles {
        markdown: out.join("report.md"),
        json: out.join("report.json"),
        plot: out.join("loss.png"),
    };

    let json = serde_json::to_string_pretty(report).map_err(|source| ReportError::Json {
        path: files.json.clone(),
        source,
    })?;
    write_file(&files.json, json + "\n")?;
    write_file(&files.markdown, markdown(report, "loss.png"))?;
    draw_loss_plot(report, &files.plot, font_available()).map_err(|message| ReportError::Plot {
        path: files.plot.clone(),
        message,
    })?;
    Ok(files)
}

fn write_file(path: &Path, contents: String) -> Result<(), ReportError> {
    fs::write(path, contents).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

// ---------------------------------------------------------------------------
// Markdown

/// The results table (one row per setting, plus the paper's figures), as printed
/// by `mixnn bench paper` and included in report.md.
pub fn table(report: &PaperReport) -> String {
    let mut s = String::new();
    s.push_str(
        "| setting | test accuracy | wall seconds | examples/s | ratio to local | params digest equal |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|:---:|\n");
    for row in &report.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            cell(&row.setting),
            accuracy(row.test_accuracy),
            fixed(row.seconds, 2),
            rate(row.examples_per_second),
            ratio(row.ratio),
            if row.digest_equal { "yes" } else { "no" },
        );
    }
    let _ = writeln!(
        s,
        "| {PAPER} | within {} of local | — | — | {}x | — |",
        plain(report.paper_accuracy_difference),
        plain(report.paper_ratio),
    );
    s
}

/// Our accuracy difference and run-time ratio beside the paper's, one line.
pub fn comparison(report: &PaperReport) -> String {
    let difference = (f64::from(report.network_accuracy) - f64::from(report.local_accuracy)).abs();
    format!(
        "Accuracy difference |network − local|: {} (paper: < {}); \
         run-time ratio network / local: {} (paper: {}x).",
        if difference.is_finite() {
            format!("{difference:.4}")
        } else {
            "n/a".to_string()
        },
        plain(report.paper_accuracy_difference),
        ratio(report.ratio),
        plain(report.paper_ratio),
    )
}

/// The runs' ratios, each party's CPU per step, the one-machine-per-party
/// projection, the CPU cost ratio and inference latencies: what `mixnn
/// bench paper` prints after the table, and report.md's "Deployment"
/// section.
pub fn deployment(report: &PaperReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Network over local wall time, {} run{}: min {} / median {} / max {} (each run: {}); \
         parameters equal to local training's in every run: {}.\n",
        report.repeats,
        if report.repeats == 1 { "" } else { "s" },
        ratio(report.ratio_min),
        ratio(report.ratio_median),
        ratio(report.ratio_max),
        report
            .ratios
            .iter()
            .map(|r| ratio(*r))
            .collect::<Vec<_>>()
            .join(", "),
        if report.all_digests_equal {
            "yes"
        } else {
            "no"
        },
    );
    if let Some(st) = &report.steady {
        let _ = writeln!(
            s,
            "Steady step (the median time between steps, without setup, checkpoints and \
             evaluation): network {} ms against local {} ms; network over local, {} run{}: \
             min {} / median {} / max {} (each run: {}).\n",
            fixed(st.network_ms, 2),
            fixed(st.local_ms, 2),
            st.ratios.len(),
            if st.ratios.len() == 1 { "" } else { "s" },
            ratio(st.ratio_min),
            ratio(st.ratio_median),
            ratio(st.ratio_max),
            st.ratios
                .iter()
                .map(|r| ratio(*r))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    let fc = &report.fixed;
    let _ = writeln!(
        s,
        "Outside the steps (the run with the median ratio): network setup {} ms, {} \
         checkpoint{} {} ms, evaluation {} ms; local training after its last step \
         (evaluation) {} ms.\n",
        fixed(fc.setup_ms, 0),
        fc.checkpoints,
        if fc.checkpoints == 1 { "" } else { "s" },
        fixed(fc.checkpoint_ms, 0),
        fixed(fc.evaluation_ms, 0),
        fixed(fc.local_evaluation_ms, 0),
    );
    s.push_str("CPU per training step, by party (the run with the median ratio):\n\n");
    s.push_str("| party | CPU ms per step | kB sent per step |\n|---|---:|---:|\n");
    let mut total = 0.0;
    for p in &report.parties {
        total += p.cpu_ms;
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            cell(&p.party),
            fixed(p.cpu_ms, 2),
            fixed(p.bytes_sent / 1000.0, 1)
        );
    }
    let _ = writeln!(
        s,
        "| all parties | {} | |\n| local training (one process) | {} wall | |\n",
        fixed(total, 2),
        fixed(report.local_step_ms, 2)
    );
    let p = &report.projection;
    let _ = writeln!(
        s,
        "Projection, one machine per party (not measured): {} ms per step = CPU {} + latency {} \
         ({} links x {} ms) + transfers {} at {} Gbit/s; {} of local training's step, \
         beside {} measured with every party on this machine's {}. Assumes each party's CPU \
         per step as measured here, one after another (no overlap between parties), whole \
         messages sent store-and-forward by the client and the layer hosts, cell by cell \
         by the mixes.\n",
        fixed(p.step_ms, 2),
        fixed(p.cpu_ms, 2),
        fixed(p.latency_ms, 2),
        p.links_per_step,
        plain(p.links.latency_ms),
        fixed(p.transfer_ms, 2),
        plain(p.links.bandwidth_bits / 1e9),
        ratio(report.projected_ratio),
        ratio(report.ratio),
        cores(),
    );
    let _ = writeln!(
        s,
        "CPU cost: core-seconds per example through the network over local: {}.\n",
        report.cpu_cost_ratio.map_or("n/a".to_string(), ratio)
    );
    match (&report.infer_network, &report.infer_local) {
        (Some(n), Some(l)) => {
            let _ = writeln!(
                s,
                "Inference, batches of {}: through a circuit median {} ms, p99 {} ms, {} examples/s; \
                 local median {} ms, p99 {} ms, {} examples/s.",
                report.batch.min(mixnn_model::EVAL_BATCH),
                fixed(n.median_ms, 2),
                fixed(n.p99_ms, 2),
                rate(n.examples_per_second),
                fixed(l.median_ms, 2),
                fixed(l.p99_ms, 2),
                rate(l.examples_per_second),
            );
        }
        _ => s.push_str("Inference: not measured.\n"),
    }
    s
}

fn cores() -> String {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{n} core{}", if n == 1 { "" } else { "s" })
}

fn markdown(report: &PaperReport, plot_name: &str) -> String {
    let mut s = String::new();
    s.push_str("# MixNN: the paper's experiment, reproduced\n\n");

    s.push_str("## Experiment\n\n");
    let _ = writeln!(s, "- architecture: `{}`", report.arch);
    let _ = writeln!(s, "- data: {}", report.data);
    let _ = writeln!(
        s,
        "- epochs: {}, batch size: {}, mixes per segment: {}",
        report.epochs, report.batch, report.mixes
    );
    let _ = writeln!(
        s,
        "- examples: {} train, {} test",
        report.train_examples, report.test_examples
    );
    let _ = writeln!(
        s,
        "- local training: {} s, test accuracy {}",
        fixed(report.local_seconds, 2),
        accuracy(report.local_accuracy)
    );
    let _ = writeln!(
        s,
        "- network training: {} s, test accuracy {}",
        fixed(report.network_seconds, 2),
        accuracy(report.network_accuracy)
    );
    let _ = writeln!(
        s,
        "- inference through fresh circuits with the model map: test accuracy {}",
        accuracy(report.infer_accuracy)
    );
    let _ = writeln!(
        s,
        "- parameters bit-for-bit equal to local training's: {}",
        if report.digest_equal { "yes" } else { "no" }
    );
    s.push_str("\nEnvironment:\n\n```text\n");
    s.push_str(report.environment.trim_end());
    s.push_str("\n```\n\n");

    s.push_str("## Results\n\n");
    s.push_str(&table(report));
    s.push('\n');
    s.push_str(&comparison(report));
    s.push_str("\n\n");

    s.push_str("## Where a training step's time goes (network)\n\n");
    let b = &report.breakdown;
    s.push_str("| part | ms per step | % of total |\n|---|---:|---:|\n");
    for (name, ms) in [
        ("compute", b.compute_ms),
        ("crypto", b.crypto_ms),
        ("serialization", b.serialization_ms),
        ("network", b.network_ms),
        ("total", b.total_ms),
    ] {
        let share = if b.total_ms > 0.0 && ms.is_finite() {
            format!("{:.1}%", 100.0 * ms / b.total_ms)
        } else {
            "n/a".to_string()
        };
        let _ = writeln!(s, "| {name} | {} | {share} |", fixed(ms, 2));
    }
    s.push('\n');

    s.push_str("## Deployment: runs, parties, projection, inference\n\n");
    s.push_str(&deployment(report));
    s.push('\n');

    s.push_str("## Route discovery as the network grows\n\n");
    if let Some(e) = &report.scaling_error {
        let _ = writeln!(s, "The simulation stopped early: {e}\n");
    }
    if report.scaling.is_empty() {
        s.push_str("(not measured)\n\n");
    } else {
        s.push_str(
            "| volunteers | discovery ms | DHT requests | requests / log2(volunteers) |\n\
             |---:|---:|---:|---:|\n",
        );
        for p in &report.scaling {
            let per_log = if p.volunteers > 1 {
                format!(
                    "{:.2}",
                    p.dht_requests as f64 / (p.volunteers as f64).log2()
                )
            } else {
                "n/a".to_string()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {per_log} |",
                p.volunteers,
                fixed(p.discovery_ms, 1),
                p.dht_requests
            );
        }
        s.push('\n');
    }

    s.push_str("## Loss per step\n\n");
    let _ = writeln!(
        s,
        "Local and network training loss per step: [{plot_name}]({plot_name}) \
         ({} local steps, {} network steps{}).",
        report.local_losses.len(),
        report.network_losses.len(),
        if losses_identical(report) {
            ", bit-for-bit identical"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "\n![loss per step]({plot_name})");
    s
}

/// A table cell: no line breaks, `|` escaped.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn accuracy(a: f32) -> String {
    if a.is_finite() {
        format!("{a:.4}")
    } else {
        "n/a".to_string()
    }
}

fn ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "n/a".to_string()
    }
}

/// `x` with `decimals` decimals; "n/a" if not finite.
fn fixed(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "n/a".to_string()
    }
}

/// A throughput: whole numbers from 100 up.
fn rate(x: f64) -> String {
    fixed(x, if x.abs() >= 100.0 { 0 } else { 1 })
}

/// The shortest exact form (the paper's figures: 7.5, 0.001).
fn plain(x: f64) -> String {
    if x.is_finite() {
        x.to_string()
    } else {
        "n/a".to_string()
    }
}

fn losses_identical(report: &PaperReport) -> bool {
    !report.local_losses.is_empty()
        && report.local_losses.len() == report.network_losses.len()
        && report
            .local_losses
            .iter()
            .zip(&report.network_losses)
            .all(|(a, b)| a.to_bits() == b.to_bits())
}

// ---------------------------------------------------------------------------
// loss.png

/// Register a font for the plot's text, once per process. False if none was found.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let from_env = std::env::var_os(FONT_ENV).map(PathBuf::from);
        from_env
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .any(|path| {
                let Ok(bytes) = fs::read(&path) else {
                    return false;
                };
                // plotters keeps fonts for the process's lifetime.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok()
            })
    })
}

const LOCAL_COLOR: RGBColor = RGBColor(31, 119, 180);
const NETWORK_COLOR: RGBColor = RGBColor(230, 85, 13);

/// Draw the loss curves to `path`. With `text` false, no text at all is drawn
/// (nothing asks the font renderer for anything).
fn draw_loss_plot(report: &PaperReport, path: &Path, text: bool) -> Result<(), String> {
    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;

    let local = points(&report.local_losses);
    let network = points(&report.network_losses);
    let (x_range, y_range) = ranges(&local, &network);
    let identical = losses_identical(report);

    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        let title = if identical {
            "Training loss per step: local vs network (identical)".to_string()
        } else {
            "Training loss per step: local vs network".to_string()
        };
        builder
            .caption(title, (FONT_FAMILY, 24).into_font())
            .x_label_area_size(45)
            .y_label_area_size(65);
    }
    let mut chart = builder
        .build_cartesian_2d(x_range.clone(), y_range.clone())
        .map_err(|e| e.to_string())?;

    if text {
        // Enough decimals to tell the ~10 y labels apart.
        let y_decimals =
            (2.0 - (y_range.end - y_range.start).log10().floor()).clamp(0.0, 6.0) as usize;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style((FONT_FAMILY, 15).into_font())
            .axis_desc_style((FONT_FAMILY, 18).into_font())
            .light_line_style(RGBColor(235, 235, 235))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.y_decimals$}"))
            .draw()
            .map_err(|e| e.to_string())?;
    } else {
        // Grid and frame by hand: the mesh would lay out labels.
        let grid = RGBColor(225, 225, 225);
        for i in 1..10 {
            let f = f64::from(i) / 10.0;
            let x = x_range.start + f * (x_range.end - x_range.start);
            let y = y_range.start + f * (y_range.end - y_range.start);
            chart
                .draw_series([
                    PathElement::new(vec![(x, y_range.start), (x, y_range.end)], grid),
                    PathElement::new(vec![(x_range.start, y), (x_range.end, y)], grid),
                ])
                .map_err(|e| e.to_string())?;
        }
        chart
            .draw_series([Rectangle::new(
                [(x_range.start, y_range.start), (x_range.end, y_range.end)],
                BLACK.stroke_width(1),
            )])
            .map_err(|e| e.to_string())?;
    }

    // Local: wide and solid; network: narrower, dashed, on top, so both show when equal.
    let local_series = chart
        .draw_series(LineSeries::new(
            local.iter().copied(),
            LOCAL_COLOR.stroke_width(4),
        ))
        .map_err(|e| e.to_string())?;
    if text {
        local_series.label("local").legend(|(x, y)| {
            PathElement::new(vec![(x, y), (x + 24, y)], LOCAL_COLOR.stroke_width(4))
        });
    }
    let network_series = chart
        .draw_series(DashedLineSeries::new(
            network.iter().copied(),
            8,
            6,
            NETWORK_COLOR.stroke_width(2),
        ))
        .map_err(|e| e.to_string())?;
    if text {
        network_series.label("network").legend(|(x, y)| {
            DashedPathElement::new(
                vec![(x, y), (x + 24, y)],
                6,
                4,
                NETWORK_COLOR.stroke_width(2),
            )
        });
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT_FAMILY, 16).into_font())
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    } else {
        // Legend swatches only, top right of the plotting area.
        let area = chart.plotting_area();
        let (px, _) = area.get_pixel_range();
        let right = px.end - 20;
        let left = right - 50;
        let top = area.get_pixel_range().1.start + 20;
        root.draw(&Rectangle::new(
            [(left - 10, top - 10), (right + 10, top + 30)],
            ShapeStyle::from(WHITE).filled(),
        ))
        .and_then(|()| {
            root.draw(&Rectangle::new(
                [(left - 10, top - 10), (right + 10, top + 30)],
                BLACK.stroke_width(1),
            ))
        })
        .and_then(|()| {
            root.draw(&PathElement::new(
                vec![(left, top), (right, top)],
                LOCAL_COLOR.stroke_width(4),
            ))
        })
        .and_then(|()| {
            root.draw(&DashedPathElement::new(
                vec![(left, top + 20), (right, top + 20)],
                8,
                6,
                NETWORK_COLOR.stroke_width(2),
            ))
        })
        .map_err(|e| e.to_string())?;
    }

    root.present().map_err(|e| e.to_string())
}

/// (step, loss) for the finite losses, steps counted from 1.
fn points(losses: &[f32]) -> Vec<(f64, f64)> {
    losses
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| ((i + 1) as f64, f64::from(l)))
        .collect()
}

fn ranges(a: &[(f64, f64)], b: &[(f64, f64)]) -> (Range<f64>, Range<f64>) {
    let all = || a.iter().chain(b);
    let x_max = all().map(|p| p.0).fold(1.0_f64, f64::max);
    let (y_min, y_max) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let y = if !y_min.is_finite() {
        0.0..1.0
    } else if y_max - y_min <= f64::EPSILON * y_max.abs().max(1.0) {
        let pad = (y_max.abs() * 0.1).max(0.5);
        y_min - pad..y_max + pad
    } else {
        let pad = (y_max - y_min) * 0.05;
        y_min - pad..y_max + pad
    };
    let x = if x_max > 1.0 { 1.0..x_max } else { 0.0..2.0 };
    (x, y)
}

#[cfg(test)]
mod tests {
    use super::super::parties::{Latency, Links, PartyCost, Projection};
    use super::super::{FixedCosts, Row, ScalingPoint, SteadyStep, StepBreakdown};
    use super::*;

    fn sample() -> PaperReport {
        let local_losses: Vec<f32> = (0..120)
            .map(|i| 2.3 * (-(i as f32) / 30.0).exp() + 0.1 + 0.05 * ((i as f32) * 0.7).sin())
            .collect();
        PaperReport {
            arch: "784-128-64-10".into(),
            data: "MNIST (synthetic test copy)".into(),
            epochs: 2,
            batch: 64,
            mixes: 1,
            train_examples: 60_000,
            test_examples: 10_000,
            local_seconds: 12.345_678,
            network_seconds: 40.123_456,
            ratio: 40.123_456 / 12.345_678,
            repeats: 3,
            ratios: vec![3.1, 3.25, 3.4],
            ratio_min: 3.1,
            ratio_median: 3.25,
            ratio_max: 3.4,
            all_digests_equal: true,
            local_accuracy: 0.971_23,
            network_accuracy: 0.971_23,
            infer_accuracy: 0.971_23,
            digest_equal: true,
            rows: vec![
                Row {
                    setting: "local".into(),
                    test_accuracy: 0.971_23,
                    seconds: 12.345_678,
                    examples_per_second: 9720.4,
                    ratio: 1.0,
                    digest_equal: true,
                    params_digest: "ab12".into(),
                },
                Row {
                    setting: "network (3 hosts, 1 mix/segment)".into(),
                    test_accuracy: 0.971_23,
                    seconds: 40.123_456,
                    examples_per_second: 2990.8,
                    ratio: 40.123_456 / 12.345_678,
                    digest_equal: true,
                    params_digest: "ab12".into(),
                },
            ],
            breakdown: StepBreakdown {
                compute_ms: 1.2,
                crypto_ms: 0.4,
                serialization_ms: 0.3,
                network_ms: 2.1,
                total_ms: 4.0,
            },
            local_step_ms: 1.3,
            steady: Some(SteadyStep {
                local_ms: 1.25,
                network_ms: 3.5,
                ratios: vec![2.7, 2.8, 3.0],
                ratio_min: 2.7,
                ratio_median: 2.8,
                ratio_max: 3.0,
            }),
            fixed: FixedCosts {
                setup_ms: 71.4,
                checkpoints: 1,
                checkpoint_ms: 104.6,
                evaluation_ms: 236.9,
                local_evaluation_ms: 161.2,
            },
            parties: vec![
                PartyCost {
                    party: "client".into(),
                    cpu_ms: 0.9,
                    bytes_sent: 220_000.0,
                    relayed_messages: 0.0,
                },
                PartyCost {
                    party: "mix …abc123".into(),
                    cpu_ms: 0.4,
                    bytes_sent: 440_000.0,
                    relayed_messages: 2.0,
                },
            ],
            projection: Projection {
                links: Links::default(),
                links_per_step: 8,
                cpu_ms: 1.3,
                latency_ms: 8.0,
                transfer_ms: 2.8,
                step_ms: 12.1,
            },
            projected_ratio: 12.1 / 1.3,
            cpu_cost_ratio: Some(2.5),
            infer_network: Some(Latency {
                batches: 10,
                median_ms: 3.5,
                p99_ms: 6.0,
                examples_per_second: 18_000.0,
            }),
            infer_local: Some(Latency {
                batches: 10,
                median_ms: 0.5,
                p99_ms: 0.9,
                examples_per_second: 120_000.0,
            }),
            scaling_error: None,
            scaling: vec![
                ScalingPoint {
                    volunteers: 16,
                    discovery_ms: 35.2,
                    dht_requests: 9,
                },
                ScalingPoint {
                    volunteers: 256,
                    discovery_ms: 80.9,
                    dht_requests: 21,
                },
            ],
            network_losses: local_losses.clone(),
            local_losses,
            paper_accuracy_difference: 0.001,
            paper_ratio: 7.5,
            environment: "test machine\nmixnn bench paper".into(),
        }
    }

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
        assert!(bytes.len() > 24, "PNG too short");
        assert_eq!(bytes[..8], SIGNATURE, "not a PNG");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk is not IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    #[test]
    fn report_writes_three_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("nested").join("report");
        let report = sample();
        let files = write_report(&report, &out).expect("write_report");

        assert_eq!(files.markdown, out.join("report.md"));
        assert_eq!(files.json, out.join("report.json"));
        assert_eq!(files.plot, out.join("loss.png"));
        for path in [&files.markdown, &files.json, &files.plot] {
            assert!(path.is_file(), "{} missing", path.display());
        }

        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&files.json).expect("read json"))
                .expect("parse json");
        for key in [
            "local_seconds",
            "network_seconds",
            "ratio",
            "local_accuracy",
            "network_accuracy",
            "digest_equal",
        ] {
            assert!(json.get(key).is_some(), "report.json lacks {key}");
        }
        assert_eq!(json["digest_equal"], serde_json::Value::Bool(true));
        assert_eq!(json["rows"].as_array().map(Vec::len), Some(2));

        let png = fs::read(&files.plot).expect("read png");
        assert_eq!(png_size(&png), PLOT_SIZE);

        let md = fs::read_to_string(&files.markdown).expect("read md");
        assert!(md.contains(
            "| setting | test accuracy | wall seconds | examples/s | ratio to local | params digest equal |"
        ));
        assert!(md.contains("7.5"));
        assert!(md.contains(&table(&report)));
        assert!(md.contains("loss.png"));
        assert!(md.contains("| compute | 1.20 | 30.0% |"));
        assert!(md.contains(&deployment(&report)));
        assert!(json["parties"].as_array().is_some_and(|p| p.len() == 2));
        assert!(json["projection"]["step_ms"].is_number());
        assert!(md.contains("| crypto | 0.40 | 10.0% |"));
        assert!(md.contains("| 256 | 80.9 | 21 | 2.62 |"));
    }

    #[test]
    fn deployment_names_every_figure() {
        let d = deployment(&sample());
        for want in [
            "3 runs: min 3.10x / median 3.25x / max 3.40x (each run: 3.10x, 3.25x, 3.40x)",
            "| mix …abc123 | 0.40 | 440.0 |",
            "| all parties | 1.30 | |",
            "12.10 ms per step = CPU 1.30 + latency 8.00 (8 links x 1 ms) + transfers 2.80 at 1 Gbit/s",
            "9.31x of local training's step",
            "network over local: 2.50x",
            "through a circuit median 3.50 ms, p99 6.00 ms",
            "local median 0.50 ms, p99 0.90 ms",
            "Steady step (the median time between steps, without setup, checkpoints and \
             evaluation): network 3.50 ms against local 1.25 ms; network over local, 3 runs: \
             min 2.70x / median 2.80x / max 3.00x (each run: 2.70x, 2.80x, 3.00x)",
            "Outside the steps (the run with the median ratio): network setup 71 ms, \
             1 checkpoint 105 ms, evaluation 237 ms; local training after its last step \
             (evaluation) 161 ms.",
        ] {
            assert!(d.contains(want), "missing {want:?} in:\n{d}");
        }
        let mut none = sample();
        none.infer_network = None;
        none.cpu_cost_ratio = None;
        none.steady = None;
        let d = deployment(&none);
        assert!(!d.contains("Steady step"), "{d}");
        assert!(
            d.contains("Inference: not measured.") && d.contains("local: n/a."),
            "{d}"
        );
    }

    #[test]
    fn table_has_rows_and_paper() {
        let report = sample();
        let t = table(&report);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2 + report.rows.len() + 1);
        assert_eq!(lines[2], "| local | 0.9712 | 12.35 | 9720 | 1.00x | yes |");
        assert!(lines[3].starts_with("| network (3 hosts, 1 mix/segment) | 0.9712 | 40.12 |"));
        assert!(lines[4].contains("2203.14803"));
        assert!(lines[4].contains("| 7.5x |"), "{}", lines[4]);
        assert!(lines[4].contains("within 0.001 of local"), "{}", lines[4]);
        let c = comparison(&report);
        assert!(
            c.contains("0.0000") && c.contains("3.25x") && c.contains("(paper: 7.5x)"),
            "{c}"
        );
    }

    #[test]
    fn plot_without_font_draws_no_text() {
        // Text drawn in no-text mode would go to an unregistered family and fail.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("loss.png");
        let mut report = sample();
        report.network_losses.iter_mut().for_each(|l| *l *= 1.05);
        draw_loss_plot(&report, &path, false).expect("draw without text");
        let png = fs::read(&path).expect("read png");
        assert_eq!(png_size(&png), PLOT_SIZE);
    }

    #[test]
    fn degenerate_losses_still_plot() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, losses) in [vec![], vec![1.0], vec![f32::NAN, 0.5, f32::INFINITY]]
            .into_iter()
            .enumerate()
        {
            let mut report = sample();
            report.local_losses = losses.clone();
            report.network_losses = losses;
            report.scaling.clear();
            report.local_seconds = 0.0;
            report.ratio = f64::NAN;
            let files = write_report(&report, &dir.path().join(i.to_string()))
                .expect("write_report with degenerate data");
            assert_eq!(
                png_size(&fs::read(&files.plot).expect("read png")),
                PLOT_SIZE
            );
        }
    }

    #[test]
    fn a_discovery_that_stopped_early_is_reported_with_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut report = sample();
        report.scaling_error = Some("with 200 volunteers: did not publish within 60 s".into());
        let files = write_report(&report, dir.path()).expect("written");
        let md = fs::read_to_string(&files.markdown).expect("report.md");
        assert!(md.contains("stopped early: with 200 volunteers"), "{md}");
        assert!(md.contains("| 16 |"), "the points measured stay: {md}");
        let json = fs::read_to_string(&files.json).expect("report.json");
        assert!(json.contains("scaling_error"));
    }

    #[test]
    fn unwritable_out_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a-file");
        fs::write(&file, b"not a directory").expect("write file");
        let report = sample();

        let err = write_report(&report, &file.join("out")).expect_err("under a regular file");
        assert!(matches!(err, ReportError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("a-file"), "{err}");

        let err = write_report(&report, &file).expect_err("out is a regular file");
        assert!(err.to_string().contains("a-file"), "{err}");
    }
}

//! Line and scatter charts written as SVG and PNG (plotters; the PNG's text
//! uses the DejaVu Sans font compiled in, so no system font is needed).
//!
//! A figure is one or more panels side by side. Log axes are drawn by
//! plotting log10 of the values and labelling ticks as powers of ten.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One named line (or set of markers) in a panel.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// (x, y) points in data units; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// Draw markers only, no connecting line (e.g. the reference policy).
    pub markers_only: bool,
    /// A palette colour chosen by the caller (so that a line and its points
    /// match); markers with a colour are filled dots. `None`: lines take
    /// the colour of their position, markers are black crosses (then dark
    /// red triangles).
    pub colour: Option<usize>,
}

impl Series {
    /// A line with markers.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, markers_only: false, colour: None }
    }

    /// Markers only.
    pub fn markers(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, markers_only: true, colour: None }
    }

    /// The same series in palette colour `index` (an empty name keeps it out
    /// of the legend).
    pub fn coloured(self, index: usize) -> Self {
        Series { colour: Some(index), ..self }
    }
}

/// One panel: axes, labels and series.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption above the panel.
    pub title: String,
    /// x-axis label.
    pub x_label: String,
    /// y-axis label.
    pub y_label: String,
    /// Logarithmic x axis.
    pub x_log: bool,
    /// Logarithmic y axis (non-positive values are skipped).
    pub y_log: bool,
    /// The series, drawn in order with a fixed colour cycle.
    pub series: Vec<Series>,
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // The bytes are a valid TrueType font shipped by the `dejavu` crate.
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans font failed to load"));
    });
}

/// Writes `<stem>.svg` and `<stem>.png` (atomically) with the panels side by
/// side; returns the two paths.
pub fn save(panels: &[Panel], stem: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    let width = 640 * panels.len() as u32;
    let height = 480;
    let svg_path = stem.with_extension("svg");
    let png_path = stem.with_extension("png");

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        draw(&root, panels)?;
        root.present().map_err(|e| anyhow!("drawing {}: {e}", svg_path.display()))?;
    }
    crate::output::write_file(&svg_path, svg.as_bytes())?;

    let mut pixels = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        draw(&root, panels)?;
        root.present().map_err(|e| anyhow!("drawing {}: {e}", png_path.display()))?;
    }
    write_png(&png_path, &pixels, width, height)?;
    Ok(vec![svg_path, png_path])
}

/// Encodes RGB pixels as PNG and writes them atomically.
fn write_png(path: &Path, pixels: &[u8], width: u32, height: u32) -> Result<()> {
    let mut png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().context("encoding PNG")?;
        writer.write_image_data(pixels).context("encoding PNG")?;
    }
    crate::output::write_file(path, &png)
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, panels: &[Panel]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plotting: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, panel) in areas.iter().zip(panels) {
        let tx = |x: f64| if panel.x_log { x.log10() } else { x };
        let ty = |y: f64| if panel.y_log { y.log10() } else { y };
        let series: Vec<Vec<(f64, f64)>> = panel
            .series
            .iter()
            .map(|s| {
                s.points
                    .iter()
                    .map(|&(x, y)| (tx(x), ty(y)))
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect()
            })
            .collect();
        let all = series.iter().flatten();
        let (mut x0, mut x1, mut y0, mut y1) =
            (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in all {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = |a: f64, b: f64| {
            let span = if b > a { b - a } else { a.abs().max(1.0) };
            (a - 0.05 * span, b + 0.05 * span)
        };
        let (x0, x1) = pad(x0, x1);
        let (y0, y1) = pad(y0, y1);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        // Ticks within 1e-9 of the axis span from zero are zero (not 3e-18).
        let eps = 1e-9 * ((x1 - x0).abs().max((y1 - y0).abs()));
        let power = |log: bool| {
            move |v: &f64| {
                tick_label(if log {
                    10f64.powf(*v)
                } else if v.abs() < eps {
                    0.0
                } else {
                    *v
                })
            }
        };
        chart
            .configure_mesh()
            .x_desc(&panel.x_label)
            .y_desc(&panel.y_label)
            .x_label_formatter(&power(panel.x_log))
            .y_label_formatter(&power(panel.y_log))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        let mut marker_series = 0;
        for (k, (s, points)) in panel.series.iter().zip(series).enumerate() {
            let color = match (s.colour, s.markers_only) {
                (Some(c), _) => COLORS[c % COLORS.len()],
                (None, true) => BLACK,
                (None, false) => COLORS[k % COLORS.len()],
            };
            let style = ShapeStyle::from(&color).filled();
            let drawn = if s.markers_only && s.colour.is_some() {
                let drawn =
                    chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, style))).map_err(err)?;
                (!s.name.is_empty()).then(|| {
                    drawn.label(&s.name).legend(move |(x, y)| Circle::new((x + 10, y), 5, style));
                });
                continue;
            } else if s.markers_only && marker_series > 0 {
                // Later marker series: filled triangles in dark red, so that
                // two marker series (e.g. trained policies and the reference) differ.
                let red = RGBColor(170, 0, 0);
                chart
                    .draw_series(points.iter().map(|&p| TriangleMarker::new(p, 8, red.filled())))
                    .map_err(err)?
                    .label(&s.name)
                    .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 5, red.filled()));
                continue;
            } else if s.markers_only {
                marker_series += 1;
                chart
                    .draw_series(points.iter().map(|&p| Cross::new(p, 8, color.stroke_width(3))))
                    .map_err(err)?
                    .label(&s.name)
                    .legend(move |(x, y)| Cross::new((x + 10, y), 5, color.stroke_width(2)));
                continue;
            } else {
                chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2))).map_err(err)?
            };
            if !s.name.is_empty() {
                drawn
                    .label(&s.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
            // Dots on the line's points, except on a dense curve of a caller's colour.
            if s.colour.is_none() {
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, style))).map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// A short tick label: up to three decimals, trailing zeros trimmed;
/// scientific notation for very large or small magnitudes.
fn tick_label(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&x.abs()) {
        return format!("{x:.0e}");
    }
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// One panel of a bar chart: one bar (with an error bar) per category, and
/// an optional marker per category.
#[derive(Debug, Clone)]
pub struct BarPanel {
    /// Caption.
    pub title: String,
    /// Category names, in order (e.g. the files compared).
    pub categories: Vec<String>,
    /// (height, error) per category.
    pub bars: Vec<(f64, f64)>,
    /// A second value per category drawn as a cross (e.g. across-input).
    pub markers: Vec<f64>,
}

/// Writes `<stem>.svg` and `<stem>.png` with the bar panels in a grid of
/// `columns` columns.
pub fn save_bars(panels: &[BarPanel], columns: usize, stem: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns).max(1);
    let (width, height) = (360 * columns as u32, 300 * rows as u32);
    let svg_path = stem.with_extension("svg");
    let png_path = stem.with_extension("png");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        draw_bars(&root, panels, rows, columns)?;
        root.present().map_err(|e| anyhow!("drawing {}: {e}", svg_path.display()))?;
    }
    crate::output::write_file(&svg_path, svg.as_bytes())?;
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        draw_bars(&root, panels, rows, columns)?;
        root.present().map_err(|e| anyhow!("drawing {}: {e}", png_path.display()))?;
    }
    write_png(&png_path, &pixels, width, height)?;
    Ok(vec![svg_path, png_path])
}

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[BarPanel],
    rows: usize,
    columns: usize,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plotting: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    for (area, panel) in root.split_evenly((rows, columns)).iter().zip(panels) {
        let n = panel.categories.len().max(1);
        let top = panel
            .bars
            .iter()
            .map(|(h, e)| h + e)
            .chain(panel.markers.iter().copied())
            .filter(|x| x.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..n as f64, 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|y: &f64| tick_label(*y))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        // Each category's name under the middle of its bar, placed by the
        // bar's pixel position (plotters' own x ticks need not fall there).
        let style = ("sans-serif", 12).into_text_style(area).pos(Pos::new(HPos::Center, VPos::Top));
        let (bx, by) = area.get_base_pixel();
        for (i, name) in panel.categories.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            area.draw(&Text::new(name.clone(), (px - bx, py - by + 4), &style)).map_err(err)?;
        }
        for (i, &(h, e)) in panel.bars.iter().enumerate() {
            if !h.is_finite() {
                // Undefined for every input (e.g. self-BLEU with one response per prompt): no bar.
                continue;
            }
            let color = COLORS[i % COLORS.len()];
            let x = i as f64;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.15, 0.0), (x + 0.85, h)],
                    color.mix(0.8).filled(),
                )))
                .map_err(err)?;
            let (lo, hi) = (h - e, h + e);
            let bar = vec![
                PathElement::new(vec![(x + 0.5, lo), (x + 0.5, hi)], BLACK.stroke_width(2)),
                PathElement::new(vec![(x + 0.4, lo), (x + 0.6, lo)], BLACK.stroke_width(2)),
                PathElement::new(vec![(x + 0.4, hi), (x + 0.6, hi)], BLACK.stroke_width(2)),
            ];
            chart.draw_series(bar).map_err(err)?;
        }
        chart
            .draw_series(
                panel
                    .markers
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.is_finite())
                    .map(|(i, &m)| Cross::new((i as f64 + 0.5, m), 6, BLACK.stroke_width(2))),
            )
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tick_labels_are_short() {
        assert_eq!(super::tick_label(2.0), "2");
        assert_eq!(super::tick_label(0.31622), "0.316");
        assert_eq!(super::tick_label(1e-4), "1e-4");
    }

    use super::*;

    /// Both files are written, the SVG names every series and the PNG is a
    /// real image of the stated size with more than one colour.
    #[test]
    fn writes_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let panel = Panel {
            title: "t".into(),
            x_label: "beta".into(),
            y_label: "reward".into(),
            x_log: true,
            y_log: false,
            series: vec![
                Series::line("reverse-kl", vec![(0.1, 1.0), (1.0, 0.5), (10.0, 0.2)]),
                Series::markers("reference", vec![(1.0, 0.1)]),
            ],
        };
        let paths = save(&[panel.clone(), panel], &dir.path().join("fig")).unwrap();
        let svg = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(svg.contains("reverse-kl") && svg.contains("reference"));
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&paths[1]).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (1280, 480));
        let first = &buf[..3];
        assert!(buf.chunks(3).any(|px| px != first), "blank image");
    }

    /// Every bar is labelled with its category (the file it stands for).
    #[test]
    fn bars_are_labelled() {
        let dir = tempfile::tempdir().unwrap();
        let panel = BarPanel {
            title: "distinct-2".into(),
            categories: vec!["policy-rkl".into(), "policy-fkl".into(), "reference".into()],
            bars: vec![(0.5, 0.1), (0.7, 0.05), (0.9, 0.0)],
            markers: vec![0.4, 0.6, 0.8],
        };
        let paths = save_bars(&[panel.clone(), panel], 2, &dir.path().join("bars")).unwrap();
        let svg = std::fs::read_to_string(&paths[0]).unwrap();
        for name in ["policy-rkl", "policy-fkl", "reference"] {
            assert_eq!(svg.matches(&format!(">\n{name}\n</text>")).count(), 2, "{name} not under its bars");
        }
    }
}

//! A two-axis chart laid out into a [`Scene`]: title, grid, ticks, series, bands, bars, a
//! legend and notes in a column on the right.
//!
//! Callers speak in data coordinates; the chart maps them to pixels, clamps what falls outside
//! the axes, and thins a series to at most four points per pixel column (first, lowest,
//! highest, last), so a series of a million samples costs the same as one of a few thousand
//! and its peaks still show.

use super::scene::{fit, Anchor, Color, Label, Scene, Shape, ADVANCE_PX, GRID, INK, MUTED};

/// Size of every chart, pixels.
pub const WIDTH: u32 = 1000;
/// Size of every chart, pixels.
pub const HEIGHT: u32 = 560;
/// The legend column's width, pixels.
const LEGEND_W: f64 = 210.0;
/// Characters a legend line holds.
const LEGEND_CHARS: usize = 32;
/// Height of the strip of [`Chart::x_strip`], pixels.
const STRIP_PX: f64 = 10.0;
/// Vertical space of one legend line, pixels.
const LEGEND_LINE: f64 = 16.0;

/// How an axis labels its ticks.
#[derive(Debug, Clone, PartialEq)]
pub enum Ticks {
    /// Round numbers between the ends.
    Numbers,
    /// Round percentages of values given as fractions (0.25 is "25%").
    Percent,
    /// Exactly these labels at these positions (a category per row, say).
    Labels(Vec<(f64, String)>),
}

/// One axis: what it shows and its range.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// The axis title, with its unit.
    pub label: String,
    /// Value at the left or bottom end.
    pub min: f64,
    /// Value at the right or top end.
    pub max: f64,
    /// Its tick labels.
    pub ticks: Ticks,
}

impl Axis {
    /// An axis from `min` to `max` (widened to a unit when the two are equal or not finite).
    pub fn new(label: impl Into<String>, min: f64, max: f64, ticks: Ticks) -> Axis {
        let min = if min.is_finite() { min } else { 0.0 };
        let max = if max.is_finite() && max > min { max } else { min + 1.0 };
        Axis {
            label: label.into(),
            min,
            max,
            ticks,
        }
    }
}

/// What a legend entry shows beside its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swatch {
    /// A short line, for a series.
    Line,
    /// A filled square, for bands and bars.
    Block,
}

/// A chart being drawn; [`Chart::finish`] gives its scene.
#[derive(Debug)]
pub struct Chart {
    scene: Scene,
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
    x: Axis,
    y: Axis,
    legend: Vec<(String, Color, Swatch)>,
    notes: Vec<String>,
}

impl Chart {
    /// A chart with its title, grid and tick labels drawn. A y axis with its own labels gets
    /// a left margin wide enough for the longest.
    pub fn new(title: &str, x: Axis, y: Axis) -> Chart {
        let y_label_chars = match &y.ticks {
            Ticks::Labels(l) => l.iter().map(|(_, s)| s.chars().count()).max().unwrap_or(0),
            _ => 7,
        };
        let left = 30.0 + (y_label_chars as f64 * f64::from(ADVANCE_PX)).clamp(42.0, 130.0);
        let (width, height) = (f64::from(WIDTH), f64::from(HEIGHT));
        let mut chart = Chart {
            scene: Scene {
                width: WIDTH,
                height: HEIGHT,
                shapes: Vec::new(),
            },
            left,
            top: 46.0,
            right: width - LEGEND_W - 20.0,
            bottom: height - 50.0,
            x,
            y,
            legend: Vec::new(),
            notes: Vec::new(),
        };
        let max_title = ((width - 20.0) / (2.0 * f64::from(ADVANCE_PX))) as usize;
        chart.label(
            Label::new(width / 2.0, 20.0, fit(title, max_title))
                .scale(2)
                .anchor(Anchor::Middle),
        );
        chart.grid();
        chart
    }

    /// Pixel x of data `x`, clamped to the plot area.
    pub fn px(&self, x: f64) -> f64 {
        let f = (x - self.x.min) / (self.x.max - self.x.min);
        (self.left + f * (self.right - self.left)).clamp(self.left, self.right)
    }

    /// Pixel y of data `y`, clamped to the plot area.
    pub fn py(&self, y: f64) -> f64 {
        let f = (y - self.y.min) / (self.y.max - self.y.min);
        (self.bottom - f * (self.bottom - self.top)).clamp(self.top, self.bottom)
    }

    /// A series through `points` (in x order), with a legend entry when `name` is not empty.
    pub fn line(&mut self, name: &str, color: Color, points: impl IntoIterator<Item = (f64, f64)>) {
        let mapped = points
            .into_iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| (self.px(x), self.py(y)));
        let points = thin(mapped);
        if !points.is_empty() {
            // A single point still shows, as a dot.
            let points = if points.len() == 1 {
                vec![points[0], points[0]]
            } else {
                points
            };
            self.scene.shapes.push(Shape::Line {
                points,
                stroke: color,
                width: 1.5,
            });
        }
        if !name.is_empty() {
            self.legend(name, color, Swatch::Line);
        }
    }

    /// A band over the whole height from `x0` to `x1`.
    pub fn x_band(&mut self, x0: f64, x1: f64, color: Color, opacity: f64) {
        let (y0, y1) = (self.y.min, self.y.max);
        self.rect((x0, x1), (y0, y1), color, opacity);
    }

    /// A mark from `x0` to `x1` in a thin strip along the top of the plot, for events too
    /// many to draw over the whole height.
    pub fn x_strip(&mut self, x0: f64, x1: f64, color: Color) {
        let (a, b) = (self.px(x0.min(x1)), self.px(x0.max(x1)));
        self.scene.shapes.push(Shape::Rect {
            x: a,
            y: self.top,
            w: b - a,
            h: STRIP_PX,
            fill: color,
            opacity: 1.0,
        });
    }

    /// A rectangle from `x0` to `x1` and `y0` to `y1`, data coordinates.
    pub fn rect(&mut self, (x0, x1): (f64, f64), (y0, y1): (f64, f64), color: Color, opacity: f64) {
        let (a, b) = (self.px(x0.min(x1)), self.px(x0.max(x1)));
        let (top, bottom) = (self.py(y0.max(y1)), self.py(y0.min(y1)));
        self.scene.shapes.push(Shape::Rect {
            x: a,
            y: top,
            w: b - a,
            h: bottom - top,
            fill: color,
            opacity,
        });
    }

    /// A legend entry.
    pub fn legend(&mut self, name: &str, color: Color, swatch: Swatch) {
        self.legend.push((fit(name, LEGEND_CHARS - 3), color, swatch));
    }

    /// A note under the legend, wrapped to its column.
    pub fn note(&mut self, text: &str) {
        self.notes.extend(wrap(text, LEGEND_CHARS));
    }

    /// The finished scene: axes, legend and notes on top of what was drawn.
    pub fn finish(mut self) -> Scene {
        let (l, t, r, b) = (self.left, self.top, self.right, self.bottom);
        self.scene.shapes.push(Shape::Line {
            points: vec![(l, t), (l, b), (r, b)],
            stroke: INK,
            width: 1.0,
        });
        let x_label = Label::new((l + r) / 2.0, f64::from(HEIGHT) - 14.0, self.x.label.as_str());
        self.label(x_label.anchor(Anchor::Middle));
        let y_label = Label::new(14.0, (t + b) / 2.0, self.y.label.as_str());
        self.label(y_label.anchor(Anchor::Middle).vertical());

        let lx = r + 20.0;
        let mut ly = t + 6.0;
        let room = ((b - t) / LEGEND_LINE) as usize;
        let entries = std::mem::take(&mut self.legend);
        let notes = std::mem::take(&mut self.notes);
        let shown = entries.len().min(room);
        for (name, color, swatch) in &entries[..shown] {
            let shape = match swatch {
                Swatch::Line => Shape::Rect {
                    x: lx,
                    y: ly - 1.0,
                    w: 16.0,
                    h: 3.0,
                    fill: *color,
                    opacity: 1.0,
                },
                Swatch::Block => Shape::Rect {
                    x: lx + 3.0,
                    y: ly - 5.0,
                    w: 10.0,
                    h: 10.0,
                    fill: *color,
                    opacity: 1.0,
                },
            };
            self.scene.shapes.push(shape);
            self.label(Label::new(lx + 22.0, ly, name.as_str()));
            ly += LEGEND_LINE;
        }
        if shown < entries.len() {
            let more = format!("+{} more", entries.len() - shown);
            self.label(Label::new(lx, ly, more).color(MUTED));
            ly += LEGEND_LINE;
        }
        ly += LEGEND_LINE / 2.0;
        for line in notes {
            if ly > b {
                break;
            }
            self.label(Label::new(lx, ly, line).color(MUTED));
            ly += 12.0;
        }
        self.scene
    }

    fn grid(&mut self) {
        let (l, t, r, b) = (self.left, self.top, self.right, self.bottom);
        for (v, label) in ticks(&self.x) {
            let x = self.px(v);
            self.scene.shapes.push(Shape::Line {
                points: vec![(x, t), (x, b)],
                stroke: GRID,
                width: 1.0,
            });
            self.label(Label::new(x, b + 12.0, label).anchor(Anchor::Middle));
        }
        let max_chars = ((l - 30.0) / f64::from(ADVANCE_PX)) as usize;
        for (v, label) in ticks(&self.y) {
            let y = self.py(v);
            self.scene.shapes.push(Shape::Line {
                points: vec![(l, y), (r, y)],
                stroke: GRID,
                width: 1.0,
            });
            self.label(Label::new(l - 6.0, y, fit(&label, max_chars)).anchor(Anchor::End));
        }
    }

    fn label(&mut self, label: Label) {
        if !label.text.is_empty() {
            self.scene.shapes.push(Shape::Text(label));
        }
    }
}

/// The tick positions and labels of `axis`.
fn ticks(axis: &Axis) -> Vec<(f64, String)> {
    match &axis.ticks {
        Ticks::Labels(labels) => labels
            .iter()
            .filter(|(v, _)| (axis.min..=axis.max).contains(v))
            .cloned()
            .collect(),
        Ticks::Numbers => nice_ticks(axis.min, axis.max)
            .into_iter()
            .map(|(v, decimals)| (v, format!("{v:.decimals$}")))
            .collect(),
        Ticks::Percent => nice_ticks(axis.min * 100.0, axis.max * 100.0)
            .into_iter()
            .map(|(v, decimals)| (v / 100.0, format!("{v:.decimals$}%")))
            .collect(),
    }
}

/// About six round values (steps of 1, 2 or 5 times a power of ten) from `min` to `max`,
/// each with the decimals its step needs.
fn nice_ticks(min: f64, max: f64) -> Vec<(f64, usize)> {
    let raw = (max - min) / 6.0;
    if !(raw.is_finite() && raw > 0.0) {
        return vec![(min, 0)];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (min / step).ceil() as i64;
    let last = (max / step + 1e-9).floor() as i64;
    (first..=last).map(|k| (k as f64 * step, decimals)).collect()
}

/// At most four points per pixel column: the first, lowest, highest and last, in order.
fn thin(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut column: Vec<(f64, f64)> = Vec::new();
    let mut current = None;
    for p in points {
        let col = p.0.floor() as i64;
        if current != Some(col) {
            flush(&mut column, &mut out);
            current = Some(col);
        }
        column.push(p);
    }
    flush(&mut column, &mut out);
    out
}

fn flush(column: &mut Vec<(f64, f64)>, out: &mut Vec<(f64, f64)>) {
    if column.is_empty() {
        return;
    }
    let last = column.len() - 1;
    // Lowest on screen is the largest pixel y; ties keep the first.
    let by_y = |a: &(usize, &(f64, f64)), b: &(usize, &(f64, f64))| a.1 .1.total_cmp(&b.1 .1);
    let lo = column.iter().enumerate().min_by(by_y).map_or(0, |(i, _)| i);
    let hi = column.iter().enumerate().max_by(by_y).map_or(0, |(i, _)| i);
    let mut keep = [0, lo, hi, last];
    keep.sort_unstable();
    let mut prev = None;
    for i in keep {
        if prev != Some(i) {
            out.push(column[i]);
            prev = Some(i);
        }
    }
    column.clear();
}

/// `text` in lines of at most `width` characters, broken at spaces where it can be.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let word = fit(word, width);
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nice_ticks_are_round_and_inside_the_range() {
        let t: Vec<f64> = nice_ticks(0.0, 100.0).into_iter().map(|(v, _)| v).collect();
        assert_eq!(t, [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let t = nice_ticks(0.013, 0.97);
        assert!(t.iter().all(|&(v, d)| (0.013..=0.97).contains(&v) && d == 1), "{t:?}");
        assert_eq!(nice_ticks(3.0, 3.0), [(3.0, 0)]);
    }

    #[test]
    fn test_percent_ticks_label_fractions() {
        let axis = Axis::new("ram", 0.0, 1.0, Ticks::Percent);
        let labels: Vec<String> = ticks(&axis).into_iter().map(|(_, s)| s).collect();
        assert_eq!(labels, ["0%", "20%", "40%", "60%", "80%", "100%"]);
    }

    #[test]
    fn test_thin_keeps_extremes_and_bounds_points_per_column() {
        let points = (0..10_000).map(|i| (i as f64 / 100.0, if i == 5_555 { 99.0 } else { (i % 7) as f64 }));
        let thinned = thin(points);
        assert!(thinned.len() <= 4 * 100, "{}", thinned.len());
        assert!(thinned.contains(&(55.55, 99.0)));
        assert_eq!(thinned.first(), Some(&(0.0, 0.0)));
        assert_eq!(thinned.last(), Some(&(99.99, (9_999 % 7) as f64)));
    }

    #[test]
    fn test_data_outside_the_axes_is_clamped_to_the_plot_area() {
        let chart = Chart::new(
            "t",
            Axis::new("x", 0.0, 10.0, Ticks::Numbers),
            Axis::new("y", 0.0, 1.0, Ticks::Percent),
        );
        assert_eq!(chart.px(-5.0), chart.px(0.0));
        assert_eq!(chart.px(50.0), chart.px(10.0));
        assert_eq!(chart.py(2.0), chart.py(1.0));
        assert!(chart.py(1.0) < chart.py(0.0), "y grows upwards");
    }

    #[test]
    fn test_wrap_breaks_at_spaces_within_the_width() {
        assert_eq!(wrap("one two three four", 9), ["one two", "three", "four"]);
        assert_eq!(wrap("", 9), Vec::<String>::new());
        assert!(wrap("averyveryverylongword x", 8)
            .iter()
            .all(|l| l.chars().count() <= 8));
    }

    #[test]
    fn test_legend_overflow_is_counted_not_drawn() {
        let mut chart = Chart::new(
            "t",
            Axis::new("x", 0.0, 1.0, Ticks::Numbers),
            Axis::new("y", 0.0, 1.0, Ticks::Numbers),
        );
        for i in 0..100 {
            chart.legend(&format!("entry {i}"), INK, Swatch::Block);
        }
        let scene = chart.finish();
        let texts: Vec<&String> = scene
            .shapes
            .iter()
            .filter_map(|s| match s {
                Shape::Text(label) => Some(&label.text),
                _ => None,
            })
            .collect();
        assert!(texts.iter().any(|t| t.starts_with('+') && t.ends_with("more")));
        assert!(!texts.iter().any(|t| *t == "entry 99"));
    }
}

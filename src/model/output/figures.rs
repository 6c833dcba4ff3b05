//! The three figures of a run, as scenes for the `plot` module to write:
//!
//! * `ram_datacenters`: RAM used per datacenter over time, as a share of the datacenter's RAM
//!   (the paper's figure: a VM's memory leaving datacenter1 and arriving in datacenter2).
//!   Migrations in flight are shaded, downtime is marked in red.
//! * `ram_hosts`: the same per host, for the hosts whose RAM use changed most (at most
//!   eight), with a note of how many are left out and by how little they changed.
//! * `migrations_timeline`: up to forty migrations, a bar each from start to end (coloured by
//!   result, queue wait before it, downtime in it); more than that, the number in flight,
//!   queued and paused over time.
//!
//! What bounds their size: at most eight series, each thinned by the chart; at most
//! [`MAX_BANDS`] shaded bands (close migrations merge); downtime as a full-height line each
//! up to [`MAX_DOWNTIME_LINES`], else as at most [`MAX_TICKS`] ticks along the top; one bar
//! per migration only up to [`MAX_BARS`].

use crate::model::plot::scene::{Color, Scene};
use crate::model::plot::{Axis, Chart, Swatch, Ticks};
use crate::model::{MigrationRecord, ModelOutcome};
use crate::units::ByteSize;

use super::topology::{fraction, HostState, Topology};

/// Series per chart; the rest are counted in a note.
pub const MAX_SERIES: usize = 8;
/// Shaded bands of migrations in flight (or in downtime) per chart.
pub const MAX_BANDS: usize = 200;
/// Downtimes drawn as full-height lines; more are drawn as ticks along the top.
pub const MAX_DOWNTIME_LINES: usize = 50;
/// Ticks of downtime along the top, about one per pixel column at most.
pub const MAX_TICKS: usize = 700;
/// Migrations drawn as a bar each; more are drawn as counts over time.
pub const MAX_BARS: usize = 40;
/// Time steps of the counts over time.
const COUNT_BINS: usize = 500;

const IN_FLIGHT: Color = Color::rgb(255, 190, 120);
const DOWNTIME: Color = Color::rgb(214, 39, 40);
const QUEUED: Color = Color::rgb(170, 170, 170);
const COMPLETED: Color = Color::rgb(44, 160, 44);
const ABORTED: Color = Color::rgb(255, 127, 14);
const FAILED: Color = Color::rgb(148, 103, 189);
const OTHER: Color = Color::rgb(127, 127, 127);

/// Every figure, by file name (without extension).
pub(crate) fn all(topology: &Topology<'_>, outcome: &ModelOutcome) -> Vec<(&'static str, Scene)> {
    let time = TimeAxis::for_end(outcome.end_s);
    vec![
        ("ram_datacenters", ram_by_datacenter(topology, outcome, &time)),
        ("ram_hosts", ram_by_host(topology, outcome, &time)),
        ("migrations_timeline", timeline(outcome, &time)),
    ]
}

/// Seconds, minutes or hours, whichever keeps the tick labels short.
#[derive(Debug, Clone, Copy)]
struct TimeAxis {
    unit: &'static str,
    seconds: f64,
    end: f64,
}

impl TimeAxis {
    fn for_end(end_s: f64) -> TimeAxis {
        let end_s = if end_s.is_finite() && end_s > 0.0 { end_s } else { 1.0 };
        let (unit, seconds) = if end_s <= 600.0 {
            ("s", 1.0)
        } else if end_s <= 36_000.0 {
            ("min", 60.0)
        } else {
            ("h", 3600.0)
        };
        TimeAxis {
            unit,
            seconds,
            end: end_s / seconds,
        }
    }

    fn at(&self, t_s: f64) -> f64 {
        t_s / self.seconds
    }

    fn axis(&self) -> Axis {
        Axis::new(format!("virtual time ({})", self.unit), 0.0, self.end, Ticks::Numbers)
    }
}

/// A percentage axis up to a little above the highest value, so that a small VM in a large
/// datacenter still shows as a step rather than a flat line at the bottom.
fn share_axis(label: &str, max_fraction: f64) -> Axis {
    let top = if max_fraction > 0.0 {
        let padded = max_fraction * 1.1;
        if max_fraction <= 1.0 {
            padded.min(1.0)
        } else {
            padded
        }
    } else {
        1.0
    };
    Axis::new(label, 0.0, top, Ticks::Percent)
}

/// One RAM chart's places (datacenters or hosts), before reading the samples.
struct Places {
    title: &'static str,
    y_label: &'static str,
    /// Plural, for the note on those left out.
    what: &'static str,
    names: Vec<String>,
    capacity_bytes: Vec<u64>,
}

fn ram_by_datacenter(topology: &Topology<'_>, outcome: &ModelOutcome, time: &TimeAxis) -> Scene {
    let places = Places {
        title: "RAM used per datacenter",
        y_label: "RAM used (share of the datacenter's)",
        what: "datacenters",
        names: topology.scenario.datacenters.iter().map(|d| d.name.clone()).collect(),
        capacity_bytes: topology.dc_ram_bytes.clone(),
    };
    ram_chart(places, topology, outcome, time, |state| {
        topology.dc_totals(state).iter().map(|t| t.ram_used_bytes).collect()
    })
}

fn ram_by_host(topology: &Topology<'_>, outcome: &ModelOutcome, time: &TimeAxis) -> Scene {
    let hosts = &topology.scenario.hosts;
    let dc_name = |h: usize| &topology.scenario.datacenters[topology.dc_of(h)].name;
    let places = Places {
        title: "RAM used per host",
        y_label: "RAM used (share of the host's)",
        what: "hosts",
        names: (0..hosts.len())
            .map(|h| format!("{} ({})", hosts[h].name, dc_name(h)))
            .collect(),
        capacity_bytes: hosts.iter().map(|h| h.ram_bytes).collect(),
    };
    ram_chart(places, topology, outcome, time, |state| state.ram_used_bytes.clone())
}

/// RAM used over time as a share of capacity, for the [`MAX_SERIES`] places whose use changed
/// most, with the migrations marked. Two walks over the samples (the changes, then the chosen
/// series) so that a thousand hosts never hold a thousand series in memory.
fn ram_chart(
    places: Places,
    topology: &Topology<'_>,
    outcome: &ModelOutcome,
    time: &TimeAxis,
    used: impl Fn(&HostState) -> Vec<u64>,
) -> Scene {
    let n = places.names.len();
    let mut range = vec![(u64::MAX, 0u64); n];
    let _ = topology.sweep(&outcome.samples, |_, state| {
        for (r, u) in range.iter_mut().zip(used(state)) {
            *r = (r.0.min(u), r.1.max(u));
        }
        Ok::<(), ()>(())
    });
    let change = |i: usize| range[i].1.saturating_sub(range[i].0);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(change(i)), i));
    let mut picked: Vec<usize> = order.iter().copied().take(MAX_SERIES).collect();
    // Scenario order, so a place keeps its colour from one run to the next.
    picked.sort_unstable();

    let mut series: Vec<Vec<(f64, f64)>> = vec![Vec::new(); picked.len()];
    let _ = topology.sweep(&outcome.samples, |t, state| {
        let now = used(state);
        for (s, &i) in series.iter_mut().zip(&picked) {
            s.push((time.at(t), fraction(now[i], places.capacity_bytes[i])));
        }
        Ok::<(), ()>(())
    });
    let max = series.iter().flatten().map(|p| p.1).fold(0.0, f64::max);
    let mut chart = Chart::new(places.title, time.axis(), share_axis(places.y_label, max));
    mark_migrations(&mut chart, &outcome.migrations, time);
    for (k, (s, &i)) in series.into_iter().zip(&picked).enumerate() {
        chart.line(&places.names[i], Color::series(k), s);
    }
    if n > picked.len() {
        let most_left = order.get(MAX_SERIES).map_or(0, |&i| change(i));
        chart.note(&format!(
            "{} of {n} {} shown: those whose RAM use changed most. The other {} changed by {} at most.",
            picked.len(),
            places.what,
            n - picked.len(),
            ByteSize(most_left)
        ));
    }
    chart.finish()
}

/// Shades the time when migrations were moving pages, and marks downtime over it: as
/// full-height lines while there are few, else as ticks in a strip along the top, where they
/// cannot hide the series.
fn mark_migrations(chart: &mut Chart, migrations: &[MigrationRecord], time: &TimeAxis) {
    if migrations.is_empty() {
        return;
    }
    for (a, b) in merge(migrations.iter().map(|m| (m.start_s, m.end_s)), time, MAX_BANDS) {
        chart.x_band(a, b, IN_FLIGHT, 0.45);
    }
    chart.legend("migration in flight", IN_FLIGHT, Swatch::Block);
    let paused = merge(migrations.iter().filter_map(downtime), time, usize::MAX);
    if paused.is_empty() {
        return;
    }
    if paused.len() <= MAX_DOWNTIME_LINES {
        for (a, b) in paused {
            chart.x_band(a, b, DOWNTIME, 0.9);
        }
        chart.legend("downtime (VM paused)", DOWNTIME, Swatch::Block);
    } else {
        for (a, b) in merge(migrations.iter().filter_map(downtime), time, MAX_TICKS) {
            chart.x_strip(a, b, DOWNTIME);
        }
        chart.legend("downtime (ticks at the top)", DOWNTIME, Swatch::Block);
    }
}

/// A migration's downtime interval, seconds.
fn downtime(m: &MigrationRecord) -> Option<(f64, f64)> {
    m.downtime_start_s
        .filter(|_| m.downtime_s > 0.0)
        .map(|s| (s, s + m.downtime_s))
}

/// The union of `intervals` (seconds) on the time axis, as about `max` intervals at most:
/// when the exact union has more, intervals closer than a `max`th of the axis merge too
/// (for shading, a gap that narrow is under a pixel or two).
fn merge(intervals: impl Iterator<Item = (f64, f64)>, time: &TimeAxis, max: usize) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = intervals
        .filter(|(a, b)| a.is_finite() && b.is_finite() && b >= a)
        .map(|(a, b)| (time.at(a), time.at(b)))
        .collect();
    v.sort_by(|x, y| x.0.total_cmp(&y.0));
    let union = |gap: f64| {
        let mut out: Vec<(f64, f64)> = Vec::new();
        for &(a, b) in &v {
            match out.last_mut() {
                Some(last) if a <= last.1 + gap => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out
    };
    let exact = union(0.0);
    if exact.len() <= max {
        exact
    } else {
        union(time.end / max as f64)
    }
}

fn result_color(result: &str) -> Color {
    match result {
        "completed" => COMPLETED,
        "aborted" => ABORTED,
        "failed" => FAILED,
        _ => OTHER,
    }
}

fn timeline(outcome: &ModelOutcome, time: &TimeAxis) -> Scene {
    let migrations = &outcome.migrations;
    if migrations.len() > MAX_BARS {
        return in_flight_chart(migrations, time);
    }
    let n = migrations.len();
    // The first migration on the top row.
    let row = |i: usize| (n - i) as f64 - 0.5;
    let labels = migrations
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                row(i),
                crate::model::plot::scene::fit(&format!("{} {}", m.vm, m.algorithm), 22),
            )
        })
        .collect();
    let y = Axis::new("migration (VM, algorithm)", 0.0, n.max(1) as f64, Ticks::Labels(labels));
    let mut chart = Chart::new("Migrations", time.axis(), y);
    let mut results: Vec<&str> = Vec::new();
    for (i, m) in migrations.iter().enumerate() {
        let r = row(i);
        if m.start_s > m.requested_at_s {
            chart.rect(
                (time.at(m.requested_at_s), time.at(m.start_s)),
                (r - 0.08, r + 0.08),
                QUEUED,
                1.0,
            );
        }
        chart.rect(
            (time.at(m.start_s), time.at(m.end_s)),
            (r - 0.3, r + 0.3),
            result_color(&m.result),
            1.0,
        );
        if let Some((a, b)) = downtime(m) {
            chart.rect((time.at(a), time.at(b)), (r - 0.4, r + 0.4), DOWNTIME, 1.0);
        }
        if !results.contains(&m.result.as_str()) {
            results.push(&m.result);
        }
    }
    for r in results {
        chart.legend(r, result_color(r), Swatch::Block);
    }
    chart.legend("waiting in a queue", QUEUED, Swatch::Block);
    chart.legend("downtime (VM paused)", DOWNTIME, Swatch::Block);
    if n == 0 {
        chart.note("No migrations.");
    }
    chart.finish()
}

/// For many migrations: how many move pages, wait in a queue, or are paused, over time (the
/// most at any moment of each time step).
fn in_flight_chart(migrations: &[MigrationRecord], time: &TimeAxis) -> Scene {
    let moving = counts(migrations.iter().map(|m| (m.start_s, m.end_s)), time);
    let queued = counts(migrations.iter().map(|m| (m.requested_at_s, m.start_s)), time);
    let paused = counts(migrations.iter().filter_map(downtime), time);
    let max = [&moving, &queued, &paused]
        .iter()
        .flat_map(|s| s.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let y = Axis::new("migrations", 0.0, (max * 1.1).max(1.0), Ticks::Numbers);
    let mut chart = Chart::new("Migrations in flight", time.axis(), y);
    chart.line("moving pages", COMPLETED, moving);
    chart.line("waiting in a queue", QUEUED, queued);
    chart.line("paused (downtime)", DOWNTIME, paused);
    chart.note(&format!(
        "{} migrations: too many for a bar each, so counted; each step shows the most at any moment in it.",
        migrations.len()
    ));
    chart.finish()
}

/// How many of `intervals` (seconds, half open) are under way, as a step line over
/// [`COUNT_BINS`] steps of the time axis, each at the most it reached.
fn counts(intervals: impl Iterator<Item = (f64, f64)>, time: &TimeAxis) -> Vec<(f64, f64)> {
    let mut events: Vec<(f64, i64)> = Vec::new();
    for (a, b) in intervals.filter(|(a, b)| a.is_finite() && b.is_finite() && b > a) {
        events.push((time.at(a), 1));
        events.push((time.at(b), -1));
    }
    // Ends before starts at one instant: back-to-back migrations are never both counted.
    events.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let width = time.end / COUNT_BINS as f64;
    let mut points = Vec::with_capacity(2 * COUNT_BINS);
    let (mut now, mut next) = (0i64, 0usize);
    for k in 0..COUNT_BINS {
        let (from, to) = (k as f64 * width, (k + 1) as f64 * width);
        while next < events.len() && events[next].0 <= from {
            now += events[next].1;
            next += 1;
        }
        let mut most = now;
        while next < events.len() && events[next].0 < to {
            now += events[next].1;
            most = most.max(now);
            next += 1;
        }
        points.push((from, most as f64));
        points.push((to, most as f64));
    }
    points
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{fixture, Spec};
    use super::*;
    use crate::model::plot::scene::INK;
    use crate::model::plot::{decode_png, png_chunks, to_png, to_svg, Shape};

    fn texts(scene: &Scene) -> Vec<&str> {
        scene
            .shapes
            .iter()
            .filter_map(|s| match s {
                Shape::Text(label) => Some(label.text.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Data series: polylines of more than two points, other than the axes.
    fn lines(scene: &Scene) -> usize {
        let series = |s: &&Shape| matches!(s, Shape::Line { points, stroke, .. } if points.len() > 2 && *stroke != INK);
        scene.shapes.iter().filter(series).count()
    }

    #[test]
    fn test_small_run_gives_three_figures_with_their_series() {
        let (scenario, outcome) = fixture(&Spec::small());
        let topo = Topology::new(&scenario, &outcome).unwrap();
        let figures = all(&topo, &outcome);
        let names: Vec<&str> = figures.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["ram_datacenters", "ram_hosts", "migrations_timeline"]);
        let dc = &figures[0].1;
        assert!(texts(dc).contains(&"datacenter1") && texts(dc).contains(&"datacenter2"));
        assert!(texts(dc).contains(&"migration in flight") && texts(dc).contains(&"downtime (VM paused)"));
        assert_eq!(lines(dc), 2);
        let hosts = &figures[1].1;
        assert_eq!(lines(hosts), 4);
        assert!(texts(hosts).contains(&"dc1-host1 (datacenter1)"));
        let timeline = &figures[2].1;
        assert!(texts(timeline).contains(&"vm1 precopy"));
        assert!(texts(timeline).contains(&"completed"));
    }

    #[test]
    fn test_svg_and_png_of_each_figure_are_well_formed() {
        let (scenario, outcome) = fixture(&Spec::small());
        let topo = Topology::new(&scenario, &outcome).unwrap();
        for (name, scene) in all(&topo, &outcome) {
            let svg = to_svg(&scene);
            assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{name}");
            assert!(svg.trim_end().ends_with("</svg>"), "{name}");
            assert!(svg.contains("<polyline"), "{name}");
            let opened = svg.matches("<text").count();
            assert_eq!(opened, svg.matches("</text>").count(), "{name}");
            let png = to_png(&scene);
            let kinds: Vec<[u8; 4]> = png_chunks(&png).into_iter().map(|(k, _)| k).collect();
            assert_eq!(kinds, [*b"IHDR", *b"IDAT", *b"IEND"]);
            let image = decode_png(&png);
            assert_eq!((image.width, image.height), (scene.width, scene.height));
            assert!(
                image.rgb.chunks_exact(3).any(|p| p != [255, 255, 255]),
                "{name} is blank"
            );
        }
    }

    #[test]
    fn test_a_thousand_hosts_give_small_readable_figures() {
        let spec = Spec {
            datacenters: 10,
            hosts_per_dc: 100,
            vms: 3000,
            migrations: 2000,
            instants: 300,
        };
        let (scenario, outcome) = fixture(&spec);
        let topo = Topology::new(&scenario, &outcome).unwrap();
        for (name, scene) in all(&topo, &outcome) {
            assert!(lines(&scene) <= MAX_SERIES + 3, "{name}");
            let bands = scene.shapes.iter().filter(|s| matches!(s, Shape::Rect { .. })).count();
            assert!(
                bands <= MAX_BANDS + MAX_TICKS + 2 * MAX_SERIES + 20,
                "{name}: {bands} rectangles"
            );
            let svg = to_svg(&scene);
            assert!(svg.len() < 200_000, "{name}: {} bytes of SVG", svg.len());
            let png = to_png(&scene);
            assert!(png.len() < 200_000, "{name}: {} bytes of PNG", png.len());
        }
        let hosts = &all(&topo, &outcome)[1].1;
        assert!(
            texts(hosts).iter().any(|t| t.starts_with("8 of 1000 hosts shown")),
            "{:?}",
            texts(hosts)
        );
        let timeline = &all(&topo, &outcome)[2].1;
        assert!(texts(timeline).contains(&"moving pages"));
    }

    #[test]
    fn test_merge_joins_overlaps_and_caps_the_bands() {
        let time = TimeAxis::for_end(100.0);
        assert_eq!(
            merge([(1.0, 3.0), (2.0, 4.0), (6.0, 7.0)].into_iter(), &time, 10),
            [(1.0, 4.0), (6.0, 7.0)]
        );
        let many = (0..5000).map(|i| (i as f64 * 0.02, i as f64 * 0.02 + 0.001));
        assert!(merge(many, &time, MAX_BANDS).len() <= MAX_BANDS + 1);
    }

    #[test]
    fn test_counts_take_the_most_in_each_step_and_never_double_count_back_to_back() {
        let time = TimeAxis::for_end(COUNT_BINS as f64);
        // Two back to back, and a third overlapping the second for an instant inside step 7.
        let c = counts([(1.0, 5.0), (5.0, 9.0), (7.2, 7.3)].into_iter(), &time);
        let at = |step: usize| c[2 * step].1;
        assert_eq!(at(0), 0.0);
        assert_eq!(at(1), 1.0);
        assert_eq!(at(5), 1.0, "one ends as the other starts");
        assert_eq!(at(7), 2.0);
        assert_eq!(at(9), 0.0);
    }

    #[test]
    fn test_time_axis_picks_a_unit_for_short_labels() {
        assert_eq!(TimeAxis::for_end(90.0).unit, "s");
        assert_eq!(TimeAxis::for_end(3600.0).unit, "min");
        assert_eq!(TimeAxis::for_end(86_400.0).unit, "h");
        assert_eq!(TimeAxis::for_end(0.0).end, 1.0);
    }

    #[test]
    fn test_share_axis_shows_small_shares_and_overcommit() {
        assert!((share_axis("", 0.002).max - 0.0022).abs() < 1e-12);
        assert_eq!(share_axis("", 0.95).max, 1.0);
        assert!(share_axis("", 1.2).max > 1.2);
        assert_eq!(share_axis("", 0.0).max, 1.0);
    }
}

//! Test-only hold points: named places in the source's run where a process test can make a
//! migration wait, so that it can send a signal to a daemon at a known point of the protocol
//! (`tests/chaos.rs`). Not a feature: nothing holds unless the environment asks for it.
//!
//! `MIGRATORY_TEST_HOLD=POINT[:MILLIS][,POINT[:MILLIS]]` (default 3000 ms per point), read once,
//! when the first point is reached. The points:
//!
//! * `precopy-round`: after the first pre-copy round has been sent (`RoundDone` is out);
//! * `stopcopy`: just after the source paused the VM, before the final pages go;
//! * `pull`: in post-copy's pull phase, once the background push has started;
//! * `committed`: just after `Commit` went out, before `Activated` is awaited.
//!
//! A configured point logs `test hold reached` (warn, with the point's name) and sleeps its
//! duration, once per migration. Unset, [`hold`] returns at once: one load of a lazily filled
//! cell and an array index.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that configures the hold points.
pub(crate) const HOLD_ENV: &str = "MIGRATORY_TEST_HOLD";

/// How long a point holds when its entry names no duration.
const DEFAULT_HOLD: Duration = Duration::from_millis(3000);

/// A place in the source's run where a test may hold a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Point {
    /// After the first pre-copy round has been sent.
    PrecopyRound,
    /// Just after the VM is paused, before the final pages go.
    Stopcopy,
    /// In post-copy's pull phase, once the push is under way.
    Pull,
    /// Just after `Commit` is sent, before `Activated` is awaited.
    Committed,
}

impl Point {
    const ALL: [Point; 4] = [Point::PrecopyRound, Point::Stopcopy, Point::Pull, Point::Committed];

    /// The point's name in [`HOLD_ENV`] and in the log line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Point::PrecopyRound => "precopy-round",
            Point::Stopcopy => "stopcopy",
            Point::Pull => "pull",
            Point::Committed => "committed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl FromStr for Point {
    type Err = TestpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Point::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| TestpointError::UnknownPoint(s.to_string()))
    }
}

/// Why [`HOLD_ENV`] could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TestpointError {
    /// An entry names no known point.
    #[error("unknown hold point {0:?} (precopy-round, stopcopy, pull, committed)")]
    UnknownPoint(String),
    /// An entry's duration is not a whole number of milliseconds.
    #[error("hold duration {millis:?} of point {point} is not a number of milliseconds")]
    BadMillis {
        /// The point's name.
        point: String,
        /// What stood after the colon.
        millis: String,
    },
}

/// How long each point holds, by [`Point::index`]; `None`: not configured.
type Holds = [Option<Duration>; 4];

/// Parses `POINT[:MILLIS][,POINT[:MILLIS]]`; empty entries are skipped.
fn parse(spec: &str) -> Result<Holds, TestpointError> {
    let mut holds = [None; 4];
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, millis) = match entry.split_once(':') {
            Some((name, millis)) => (name.trim(), Some(millis.trim())),
            None => (entry, None),
        };
        let point: Point = name.parse()?;
        let duration = match millis {
            None => DEFAULT_HOLD,
            Some(m) => m
                .parse()
                .map(Duration::from_millis)
                .map_err(|_| TestpointError::BadMillis {
                    point: name.to_string(),
                    millis: m.to_string(),
                })?,
        };
        holds[point.index()] = Some(duration);
    }
    Ok(holds)
}

fn configured() -> &'static Holds {
    static HOLDS: OnceLock<Holds> = OnceLock::new();
    HOLDS.get_or_init(|| match std::env::var(HOLD_ENV) {
        Ok(spec) => parse(&spec).unwrap_or_else(|e| {
            // A test that mistypes a point must see why nothing holds.
            tracing::warn!(error = %e, "ignoring {HOLD_ENV}");
            [None; 4]
        }),
        Err(_) => [None; 4],
    })
}

/// The last migration held at each point, plus one (0: none yet). A point reached again by the
/// same migration (the next pre-copy round, a pull resumed after recovery) does not hold again.
static HELD: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Test-only: holds `migration` at `point` for the configured time, once per migration, if
/// [`HOLD_ENV`] names the point; returns at once otherwise.
pub(crate) async fn hold(point: Point, migration: u64) {
    let Some(duration) = configured()[point.index()] else {
        return;
    };
    let mark = migration.wrapping_add(1);
    if HELD[point.index()].swap(mark, Ordering::Relaxed) == mark {
        return;
    }
    tracing::warn!(
        point = point.name(),
        migration,
        hold_ms = duration.as_millis() as u64,
        "test hold reached"
    );
    tokio::time::sleep(duration).await;
}

/// Test-only: the `committed` hold, placed where the source awaits a reply. `Activated` is
/// awaited only right after `Commit` went out (in both the pre-copy and the post-copy order),
/// so one call in the reply wait covers both.
pub(crate) async fn hold_before_reply(awaited: &str, migration: u64) {
    if awaited == "Activated" {
        hold(Point::Committed, migration).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_reads_points_and_durations() {
        let holds = parse("stopcopy:250, committed").unwrap();
        assert_eq!(holds[Point::Stopcopy.index()], Some(Duration::from_millis(250)));
        assert_eq!(holds[Point::Committed.index()], Some(DEFAULT_HOLD));
        assert_eq!(holds[Point::Pull.index()], None);
        assert_eq!(holds[Point::PrecopyRound.index()], None);
    }

    #[test]
    fn test_parse_rejects_unknown_points_and_bad_durations() {
        assert_eq!(parse("pul"), Err(TestpointError::UnknownPoint("pul".into())));
        assert_eq!(
            parse("pull:soon"),
            Err(TestpointError::BadMillis {
                point: "pull".into(),
                millis: "soon".into()
            })
        );
    }

    #[test]
    fn test_every_point_name_parses_back() {
        for p in Point::ALL {
            assert_eq!(p.name().parse::<Point>(), Ok(p));
        }
        assert_eq!(parse("").unwrap(), [None; 4]);
    }
}

//! The bench's table: rows of samples, their median and p99, the goal each should meet, and
//! how they print.

use std::fmt::Write as _;
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

impl BenchError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

/// How much work each row does.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub quick: bool,
}

impl Scale {
    /// Repetitions: `full` normally, `quick` with `--quick`.
    pub fn reps(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// Median and p99 of samples (nearest rank).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub p99: f64,
    pub n: usize,
}

impl Stats {
    /// `None` for no samples; NaNs are dropped.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = (q * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1]
        };
        Some(Stats {
            median: rank(0.5),
            p99: rank(0.99),
            n: v.len(),
        })
    }
}

/// Which way a figure should go.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
    None,
}

/// One line of the table.
#[derive(Debug)]
pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub result: Result<Stats, String>,
    pub goal: Goal,
    /// For throughput rows the p99 is the slow end: the 1st percentile of the rates.
    pub higher_is_better: bool,
}

impl Row {
    pub fn new(name: impl Into<String>, unit: &'static str, goal: Goal) -> Row {
        Row {
            name: name.into(),
            unit,
            result: Err("not measured".into()),
            goal,
            higher_is_better: unit.ends_with("/s") || unit == "×",
        }
    }

    /// Samples in the row's unit.
    pub fn samples(mut self, v: &[f64]) -> Row {
        self.result = if self.higher_is_better {
            // The p99 of a rate is its slow tail: take it over the inverted samples.
            let inv: Vec<f64> = v.iter().map(|x| -x).collect();
            Stats::of(&inv)
                .map(|s| Stats {
                    median: -s.median,
                    p99: -s.p99,
                    n: s.n,
                })
                .ok_or_else(|| "no samples".into())
        } else {
            Stats::of(v).ok_or_else(|| "no samples".into())
        };
        self
    }

    pub fn absent(mut self, why: impl Into<String>) -> Row {
        self.result = Err(why.into());
        self
    }

    fn verdict(&self) -> &'static str {
        let Ok(s) = &self.result else { return "" };
        match self.goal {
            Goal::AtMost(t) if s.median <= t => "met",
            Goal::AtLeast(t) if s.median >= t => "met",
            Goal::None => "",
            _ => "MISSED",
        }
    }
}

/// Throughput in MiB/s of `bytes` moved in `d`.
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64().max(1e-9)
}

fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_goal(g: Goal) -> String {
    match g {
        Goal::AtMost(t) => format!("≤ {}", fmt_num(t)),
        Goal::AtLeast(t) => format!("≥ {}", fmt_num(t)),
        Goal::None => String::new(),
    }
}

/// The table, as printed. `judged` is false where every figure times an emulated CPU
/// (QEMU TCG): the targets are for real hosts, so the verdict column says "n/a".
pub fn render(header: &str, rows: &[Row], judged: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    let name_w = rows
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(10)
        .max(10);
    let _ = writeln!(
        out,
        "{:<name_w$}  {:>10}  {:>10}  {:<6}  {:>8}  {:>9}  verdict",
        "measure", "median", "p99", "unit", "n", "target"
    );
    for r in rows {
        match &r.result {
            Ok(s) => {
                let _ = writeln!(
                    out,
                    "{:<name_w$}  {:>10}  {:>10}  {:<6}  {:>8}  {:>9}  {}",
                    r.name,
                    fmt_num(s.median),
                    fmt_num(s.p99),
                    r.unit,
                    s.n,
                    fmt_goal(r.goal),
                    match (judged, r.verdict()) {
                        (false, v) if !v.is_empty() => "n/a",
                        (_, v) => v,
                    }
                );
            }
            Err(why) => {
                let _ = writeln!(out, "{:<name_w$}  absent: {why}", r.name);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p99_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&v).unwrap();
        assert_eq!((s.median, s.p99, s.n), (50.0, 99.0, 100));
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.p99), (2.0, 3.0));
        assert!(Stats::of(&[]).is_none());
        assert!(Stats::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn rates_take_the_slow_tail_and_verdicts_follow_the_goal() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let r = Row::new("up", "MiB/s", Goal::AtLeast(40.0)).samples(&v);
        let s = r.result.as_ref().unwrap();
        assert_eq!((s.median, s.p99), (51.0, 2.0));
        assert_eq!(r.verdict(), "met");
        let r = Row::new("rtt", "µs", Goal::AtMost(10.0)).samples(&v);
        assert_eq!(r.verdict(), "MISSED");
        let r = Row::new("x", "ms", Goal::None).absent("because");
        let t = render("h", &[r], true);
        assert!(t.contains("absent: because"), "{t}");
        let rtt = || Row::new("rtt", "µs", Goal::AtMost(10.0)).samples(&v);
        assert!(render("h", &[rtt()], true).contains("MISSED"));
        let t = render("h", &[rtt()], false);
        assert!(t.contains("n/a") && !t.contains("MISSED"), "{t}");
    }
}

//! Statistics, the result rows, the table printed at the end, and the generated
//! blocks of `docs/benchmarks.md`.
//!
//! The doc is part hand-written (what each case means, what was found) and part
//! generated: a run replaces only the text between `<!-- BEGIN GENERATED: NAME -->`
//! and `<!-- END GENERATED: NAME -->`, so sections that others add around the
//! blocks (the five-host lab's, say) survive every rewrite.

use crate::sys::Machine;
use std::fmt::Write as _;
use std::time::Duration;

/// Sorted copy of `v` (NaN-free input).
fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

/// The median (the mean of the two middle values for an even count).
pub fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    let n = s.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The `p`-th percentile by nearest rank (p95 of 100 values is the 95th smallest).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let s = sorted(v);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// Minimum and maximum.
pub fn min_max(v: &[f64]) -> (f64, f64) {
    let s = sorted(v);
    (s.first().copied().unwrap_or(f64::NAN), s.last().copied().unwrap_or(f64::NAN))
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A duration in ms, shown in the unit that reads best.
pub fn show_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 10_000.0 {
        format!("{:.1} s", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2} s", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// KiB shown as MiB.
pub fn show_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Where a figure stands against its target.
#[derive(Clone, Debug, PartialEq)]
pub enum Stands {
    /// The target is met.
    Met,
    /// The target is missed.
    Missed,
    /// There is no target for this row (a comparison).
    NoTarget,
    /// Not measured in this run, and why.
    NotMeasured(String),
}

impl Stands {
    /// Met when `ok`, else missed.
    pub fn from(ok: bool) -> Stands {
        if ok {
            Stands::Met
        } else {
            Stands::Missed
        }
    }

    fn text(&self) -> String {
        match self {
            Stands::Met => "met".into(),
            Stands::Missed => "MISSED".into(),
            Stands::NoTarget => "-".into(),
            Stands::NotMeasured(why) => format!("not measured: {why}"),
        }
    }
}

/// One line of the result table.
#[derive(Clone, Debug)]
pub struct Row {
    /// The case number (1-9).
    pub case: u8,
    /// What is measured, short.
    pub what: String,
    /// The figure.
    pub figure: String,
    /// The baseline beside it, and where it comes from.
    pub baseline: String,
    /// figure / baseline, when both are numbers.
    pub ratio: Option<f64>,
    /// The target.
    pub target: String,
    /// Where the figure stands.
    pub stands: Stands,
}

impl Row {
    /// A row for a case that did not run or failed.
    pub fn not_measured(case: u8, what: &str, target: &str, why: &str) -> Row {
        Row {
            case,
            what: what.into(),
            figure: "-".into(),
            baseline: "-".into(),
            ratio: None,
            target: target.into(),
            stands: Stands::NotMeasured(why.into()),
        }
    }
}

/// Everything a run found.
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// The run's settings (quick or full, trial counts, server timings).
    pub settings: Vec<String>,
    /// The rows, in case order.
    pub rows: Vec<Row>,
    /// How each case was measured, by case number.
    pub how: Vec<(u8, String)>,
    /// How long the whole run took.
    pub took: Duration,
    /// The command that produced it.
    pub command: String,
}

fn ratio_text(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

impl Report {
    fn machine_line(&self) -> String {
        let m = &self.machine;
        format!(
            "{} cores ({}), {:.0} GiB memory, Linux {}, files on {}; load average {:.2} at the start, {:.2} at the end",
            m.cores, m.cpu, m.memory_gib, m.kernel, m.fs, m.load.0, m.load.1
        )
    }

    /// The table for the terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "replibox bench: commit {}, `{}`, {:.0} s",
            self.machine.commit,
            self.command,
            self.took.as_secs_f64()
        );
        let _ = writeln!(out, "machine: {}", self.machine_line());
        for s in &self.settings {
            let _ = writeln!(out, "setting: {s}");
        }
        let heads = ["#", "what", "figure", "baseline (same run unless cited)", "ratio", "target", "stands"];
        let cells: Vec<[String; 7]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.case.to_string(),
                    r.what.clone(),
                    r.figure.clone(),
                    r.baseline.clone(),
                    ratio_text(r.ratio),
                    r.target.clone(),
                    r.stands.text(),
                ]
            })
            .collect();
        let mut width = heads.map(str::len);
        for c in &cells {
            for (w, cell) in width.iter_mut().zip(c) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cols: &[String]| {
            let mut l = String::new();
            for (i, c) in cols.iter().enumerate() {
                let pad = width[i] - c.chars().count();
                l.push_str(c);
                l.push_str(&" ".repeat(pad));
                l.push_str(if i + 1 < cols.len() { " | " } else { "" });
            }
            l.trim_end().to_string()
        };
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", line(&heads.map(String::from)));
        let _ = writeln!(out, "{}", width.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-"));
        for c in &cells {
            let _ = writeln!(out, "{}", line(c));
        }
        let _ = writeln!(out);
        for (case, how) in &self.how {
            let _ = writeln!(out, "how {case}: {how}");
        }
        out
    }

    /// The generated block of the doc (Markdown).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Run: `{}` at commit {}, {:.0} s in all.\n\nMachine: {}.\n",
            self.command,
            self.machine.commit,
            self.took.as_secs_f64(),
            self.machine_line()
        );
        let _ = writeln!(out, "Settings:");
        for s in &self.settings {
            let _ = writeln!(out, "- {s}");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| # | what | figure | baseline (same run unless cited) | ratio | target | where it stands |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let stands = match r.stands {
                Stands::Met => "**met**".to_string(),
                Stands::Missed => "**missed**".to_string(),
                _ => r.stands.text(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.case,
                md_cell(&r.what),
                md_cell(&r.figure),
                md_cell(&r.baseline),
                ratio_text(r.ratio),
                md_cell(&r.target),
                md_cell(&stands)
            );
        }
        let _ = writeln!(out, "\nHow each row was measured:\n");
        for (case, how) in &self.how {
            let _ = writeln!(out, "- **{case}.** {how}");
        }
        out
    }
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// Replaces the generated block `name` of `doc` with `body`; appends the block
/// (under `heading`) when the doc has none yet.
pub fn replace_block(doc: &str, name: &str, heading: &str, body: &str) -> String {
    let begin = format!("<!-- BEGIN GENERATED: {name} (replibox-bench rewrites this block; edit outside it) -->");
    let end = format!("<!-- END GENERATED: {name} -->");
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    let start = doc.find(&format!("<!-- BEGIN GENERATED: {name} "));
    let stop = doc.find(&end);
    match (start, stop) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &doc[..a], &doc[b + end.len()..]),
        _ => format!("{}\n\n{heading}\n\n{block}\n", doc.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 95.0), 95.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 95.0), 10.0);
        assert_eq!(min_max(&[2.0, 9.0, 1.0]), (1.0, 9.0));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(show_ms(3.25), "3.2 ms");
        assert_eq!(show_ms(27.4), "27 ms");
        assert_eq!(show_ms(1534.0), "1.53 s");
        assert_eq!(show_ms(105_000.0), "105.0 s");
    }

    #[test]
    fn a_block_is_replaced_in_place_and_the_rest_kept() {
        let doc = "# Benchmarks\n\nintro\n\n## Results\n\n<!-- BEGIN GENERATED: bench (replibox-bench rewrites this block; edit outside it) -->\nold\n<!-- END GENERATED: bench -->\n\n## Host loss (lab)\n\nkept\n";
        let new = replace_block(doc, "bench", "## Results", "new table");
        assert!(new.contains("\nnew table\n<!-- END GENERATED: bench -->"));
        assert!(!new.contains("old"));
        assert!(new.starts_with("# Benchmarks\n\nintro\n\n## Results\n\n<!-- BEGIN"));
        assert!(new.ends_with("## Host loss (lab)\n\nkept\n"));
        // Rewriting again gives the same text.
        assert_eq!(replace_block(&new, "bench", "## Results", "new table"), new);
    }

    #[test]
    fn a_missing_block_is_appended_under_its_heading() {
        let new = replace_block("# Benchmarks\n", "bench-peers", "## Syncthing", "t");
        assert!(new.starts_with("# Benchmarks\n\n## Syncthing\n\n<!-- BEGIN GENERATED: bench-peers"));
        assert!(new.ends_with("t\n<!-- END GENERATED: bench-peers -->\n"));
    }

    #[test]
    fn the_table_lines_up_and_says_where_targets_stand() {
        let report = Report {
            machine: Machine {
                cores: 2,
                cpu: "cpu".into(),
                memory_gib: 24.0,
                kernel: "6".into(),
                fs: "ext2/ext3".into(),
                load: (1.0, 2.0),
                commit: "abc".into(),
            },
            settings: vec!["quick".into()],
            rows: vec![
                Row {
                    case: 1,
                    what: "failover".into(),
                    figure: "median 9 ms".into(),
                    baseline: "etcd 360 ms (cited)".into(),
                    ratio: Some(0.025),
                    target: "median < 100 ms".into(),
                    stands: Stands::Met,
                },
                Row::not_measured(2, "host loss", "< 600 ms", "needs root"),
            ],
            how: vec![(1, "kill -9".into())],
            took: Duration::from_secs(3),
            command: "replibox-bench --quick".into(),
        };
        let text = report.text();
        assert!(text.contains("| met"), "{text}");
        assert!(text.contains("not measured: needs root"), "{text}");
        let md = report.markdown();
        assert!(
            md.contains("| 1 | failover | median 9 ms | etcd 360 ms (cited) | 0.03x | median < 100 ms | **met** |"),
            "{md}"
        );
        assert!(md.contains("- **1.** kill -9"), "{md}");
    }
}

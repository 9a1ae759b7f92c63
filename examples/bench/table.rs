//! The one table: every row with what it measured, the baseline measured in the same run, their
//! ratio, the goal, and whether the goal is met. Rows cross process boundaries (the ledger runs
//! in a child process) as JSON.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub what: String,
    pub measured: String,
    pub baseline: String,
    /// measured ÷ baseline, in the row's own sense (see `what`).
    pub ratio: Option<f64>,
    pub goal: String,
    /// `None`: no goal (a figure reported for context).
    pub pass: Option<bool>,
}

impl Row {
    pub fn new(id: &str, what: &str, measured: String, baseline: String) -> Row {
        Row { id: id.into(), what: what.into(), measured, baseline, ratio: None, goal: "—".into(), pass: None }
    }

    pub fn ratio(mut self, ratio: f64) -> Row {
        self.ratio = Some(ratio);
        self
    }

    pub fn goal(mut self, goal: &str, pass: bool) -> Row {
        self.goal = goal.into();
        self.pass = Some(pass);
        self
    }
}

/// A Markdown table (it is pasted into docs/benchmarks.md as printed).
pub fn render(rows: &[Row]) -> String {
    let mut out = String::from("| # | row | measured | baseline (same run) | ratio | goal | result |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        let ratio = r.ratio.map_or("—".to_string(), |x| format!("{x:.2}"));
        let result = match r.pass {
            Some(true) => "pass",
            Some(false) => "**FAIL**",
            None => "—",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.id, r.what, r.measured, r.baseline, ratio, r.goal, result
        ));
    }
    let goals = rows.iter().filter(|r| r.pass.is_some()).count();
    let met = rows.iter().filter(|r| r.pass == Some(true)).count();
    out.push_str(&format!("\n{met} of {goals} goals met.\n"));
    out
}

/// Nearest-rank percentile of sorted values (`p` in 0..=1).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// p50 and p99 of latencies (seconds), in milliseconds.
pub fn p50_p99_ms(latencies: &mut [f64]) -> (f64, f64) {
    latencies.sort_by(f64::total_cmp);
    (percentile(latencies, 0.50) * 1e3, percentile(latencies, 0.99) * 1e3)
}

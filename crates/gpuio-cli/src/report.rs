//! How `gpuio bench` shows its results: a table for people, one JSON object for programs.

use std::path::Path;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use gpuio::size::format_bytes;
use serde_json::{json, Value};

use crate::bench::Outcome;
use crate::workload::Measurement;

fn latency_json(m: &Measurement) -> Value {
    json!({
        "mean": m.latency.mean_us,
        "p50": m.latency.p50_us,
        "p99": m.latency.p99_us,
        "p99.9": m.latency.p999_us,
        "max": m.latency.max_us,
    })
}

fn cpu_json(m: &Measurement) -> Value {
    json!({
        "user_s": m.cpu_user_s,
        "sys_s": m.cpu_sys_s,
        "per_io_us": m.cpu_us_per_io(),
    })
}

fn outcome_json(o: &Outcome, path: &Path) -> Value {
    let e = &o.engine;
    let base = e.iops().max(1e-9);
    let baselines: Vec<Value> = o
        .baselines
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "backend": b.backend,
                "direct": b.direct,
                "iops": b.iops(),
                "bytes_per_sec": b.bytes_per_sec(),
                "latency_us": latency_json(b),
                "cpu": cpu_json(b),
                "duration_s": b.elapsed_s,
                // How gpu-io compares: its IOPS divided by this reference's.
                "gpuio_ratio": base / b.iops().max(1e-9),
            })
        })
        .collect();
    let mut v = json!({
        "pattern": o.spec.pattern.name(),
        "block_size": o.spec.block_size,
        "queue_depth": o.spec.queue_depth,
        "threads": o.spec.threads,
        "backend": e.backend,
        "direct": e.direct,
        "iops": e.iops(),
        "bytes_per_sec": e.bytes_per_sec(),
        "latency_us": latency_json(e),
        "cpu": cpu_json(e),
        "duration_s": e.elapsed_s,
        "ops": e.ops,
        "file": path.display().to_string(),
        "region_bytes": o.spec.region,
    });
    if !o.baselines.is_empty() || !o.notes.is_empty() {
        v["baselines"] = Value::Array(baselines);
        v["notes"] = json!(o.notes);
    }
    v
}

/// One JSON object: the workload's own object for a single `--pattern`, else `{"results": [...]}`.
pub fn json(outcomes: &[Outcome], path: &Path, single: bool) -> String {
    let v = if single && outcomes.len() == 1 {
        outcome_json(&outcomes[0], path)
    } else {
        json!({ "results": outcomes.iter().map(|o| outcome_json(o, path)).collect::<Vec<_>>() })
    };
    serde_json::to_string_pretty(&v).expect("JSON values always serialize")
}

fn row(t: &mut Table, o: &Outcome, m: &Measurement, engine_iops: f64) {
    let mut cells = vec![
        Cell::new(&m.name),
        Cell::new(format!(
            "{}{}",
            m.backend,
            if m.direct { " direct" } else { "" }
        )),
        Cell::new(format!("{:.0}", m.iops())),
        Cell::new(format!("{}/s", format_bytes(m.bytes_per_sec()))),
        Cell::new(format!("{:.0}", m.latency.p50_us)),
        Cell::new(format!("{:.0}", m.latency.p99_us)),
        Cell::new(format!("{:.0}", m.latency.p999_us)),
        Cell::new(format!("{:.2}/{:.2}", m.cpu_user_s, m.cpu_sys_s)),
        Cell::new(format!("{:.1}", m.cpu_us_per_io())),
    ];
    if !o.baselines.is_empty() {
        let ratio = if std::ptr::eq(m, &o.engine) {
            "1.00".to_string()
        } else {
            format!("{:.2}", engine_iops / m.iops().max(1e-9))
        };
        cells.push(Cell::new(ratio));
    }
    t.add_row(cells);
}

/// A table per workload, gpu-io first, then each reference with gpu-io's IOPS ratio to it.
pub fn table(outcomes: &[Outcome], path: &Path) -> String {
    let mut s = format!("file: {}\n", path.display());
    for o in outcomes {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        let mut header = vec![
            "engine",
            "path",
            "IOPS",
            "bandwidth",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "CPU usr/sys s",
            "CPU µs/IO",
        ];
        if !o.baselines.is_empty() {
            header.push("gpu-io ×");
        }
        t.set_header(header);
        let iops = o.engine.iops();
        row(&mut t, o, &o.engine, iops);
        for b in &o.baselines {
            row(&mut t, o, b, iops);
        }
        for col in 2..10 {
            if let Some(c) = t.column_mut(col) {
                c.set_cell_alignment(CellAlignment::Right);
            }
        }
        s.push_str(&format!(
            "\n{} {} QD{} over {} ({:.1} s)\n{t}\n",
            o.spec.pattern.name(),
            format_bytes(o.spec.block_size as f64),
            o.spec.queue_depth,
            format_bytes(o.spec.region as f64),
            o.engine.elapsed_s
        ));
        for n in &o.notes {
            s.push_str(&format!("note: {n}\n"));
        }
    }
    if outcomes.iter().any(|o| !o.baselines.is_empty()) {
        s.push_str("\n'gpu-io ×' is gpu-io's IOPS divided by that engine's, measured in this run on this file.\n");
    }
    s
}

/// Prints one JSON object (every command's `--json` output).
pub(crate) fn print_json(v: &serde_json::Value) -> gpuio::Result<()> {
    outln!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values always serialize")
    )
}

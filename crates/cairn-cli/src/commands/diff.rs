//! `cairn diff`: keys only in A, only in B, changed (dtype, shape, max abs and max relative
//! difference for floats), identical.

use std::process::ExitCode;

use cairn::{Entry, LoadOptions};

use crate::output;
use crate::CommandResult;

pub fn run(a: &str, b: &str) -> CommandResult {
    let (left, _) = cairn::load(a, &LoadOptions::default())?;
    let (right, _) = cairn::load(b, &LoadOptions::default())?;
    let mut differ = false;
    let mut identical = 0usize;
    for (key, _) in left.iter().filter(|(k, _)| right.get(k).is_none()) {
        println!("only in A: {}", output::clean(key));
        differ = true;
    }
    for (key, _) in right.iter().filter(|(k, _)| left.get(k).is_none()) {
        println!("only in B: {}", output::clean(key));
        differ = true;
    }
    for (key, l) in left.iter() {
        let Some(r) = right.get(key) else { continue };
        match describe(l, r) {
            None => identical += 1,
            Some(change) => {
                println!("changed: {}: {change}", output::clean(key));
                differ = true;
            }
        }
    }
    println!("identical: {identical} keys");
    Ok(if differ { super::found_problems() } else { ExitCode::SUCCESS })
}

/// How `r` differs from `l`, or `None` when they are equal (bit-exact).
fn describe(l: &Entry, r: &Entry) -> Option<String> {
    match (l, r) {
        (Entry::Tensor(a), Entry::Tensor(b)) => {
            if a.dtype() != b.dtype() || a.shape() != b.shape() {
                return Some(format!("{} {:?} -> {} {:?}", a.dtype().name(), a.shape(), b.dtype().name(), b.shape()));
            }
            if a.data() == b.data() {
                return None;
            }
            let (Some(x), Some(y)) = (a.to_f64s(), b.to_f64s()) else {
                return Some(format!("{} {:?}: values differ", a.dtype().name(), a.shape()));
            };
            let (mut abs, mut rel) = (0f64, 0f64);
            for (u, v) in x.iter().zip(&y) {
                let d = (u - v).abs();
                abs = abs.max(d);
                if u.abs() > 0.0 {
                    rel = rel.max(d / u.abs());
                }
            }
            Some(format!("{} {:?}: max abs diff {abs:.6e}, max rel diff {rel:.6e}", a.dtype().name(), a.shape()))
        }
        (Entry::Value(a), Entry::Value(b)) if a == b => None,
        (Entry::Value(a), Entry::Value(b)) => Some(format!("value {a:?} -> {b:?}")),
        _ => Some("tensor <-> value".to_string()),
    }
}

//! The runner every proptest fuzzer of the workspace shares: a case count
//! from `TALLY_FUZZ_CASES` (the target's default otherwise) and a ChaCha RNG
//! seeded from `TALLY_FUZZ_SEED` (decimal or `0x` hex; a fixed default), so
//! that CI is deterministic and a long run is one environment variable away.
//! Also small helpers on JSON trees the fuzzers mutate.

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;
use std::fmt::Debug;

/// The seed when `TALLY_FUZZ_SEED` is not set.
pub const FUZZ_SEED_DEFAULT: u64 = 0x7a11_7a11;

fn fuzz_cases(default_cases: u32) -> u32 {
    match std::env::var("TALLY_FUZZ_CASES") {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| panic!("TALLY_FUZZ_CASES={text:?} is not a case count")),
        Err(_) => default_cases,
    }
}

fn fuzz_seed() -> u64 {
    let Ok(text) = std::env::var("TALLY_FUZZ_SEED") else {
        return FUZZ_SEED_DEFAULT;
    };
    let digits = text.trim().replace('_', "");
    let parsed = match digits.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => digits.parse().ok(),
    };
    parsed.unwrap_or_else(|| panic!("TALLY_FUZZ_SEED={text:?} is not a u64"))
}

/// Runs `property` on `cases` inputs drawn from `strategy` with a ChaCha RNG
/// seeded from `TALLY_FUZZ_SEED`, and panics with the shrunk input (and the
/// seed and count that reproduce it) on failure. Prints one line with the
/// figures on success.
pub fn fuzz<S>(target: &str, default_cases: u32, strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let cases = fuzz_cases(default_cases);
    let seed = fuzz_seed();
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    if let Err(failure) = runner.run(&strategy, property) {
        panic!("fuzz {target}: failed with TALLY_FUZZ_SEED={seed:#x} TALLY_FUZZ_CASES={cases}: {failure}");
    }
    eprintln!("fuzz {target}: {cases} cases, seed {seed:#x}");
}

/// Every JSON pointer below `prefix` in `value` (objects' keys escaped as
/// RFC 6901 says), parents before children.
pub fn json_paths(value: &Value, prefix: &str, paths: &mut Vec<String>) {
    let escape = |key: &str| key.replace('~', "~0").replace('/', "~1");
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let path = format!("{prefix}/{}", escape(key));
                paths.push(path.clone());
                json_paths(child, &path, paths);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                let path = format!("{prefix}/{index}");
                paths.push(path.clone());
                json_paths(child, &path, paths);
            }
        }
        _ => {}
    }
}

//! The runner every proptest fuzzer of the workspace shares: a case count
//! from `TALLY_FUZZ_CASES` (the target's default otherwise) and a ChaCha RNG
//! seeded from `TALLY_FUZZ_SEED` (decimal or `0x` hex; a fixed default), so
//! that CI is deterministic and a long run is one environment variable away.
//! Also the text damage the fuzzers share and small helpers on JSON trees
//! they mutate.

use proptest::prelude::{BoxedStrategy, Strategy, any, prop_oneof};
use proptest::sample::{Index, select};
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

/// Damage to text, applied to its bytes: what the fuzzers do to stored
/// payloads, Stripe bodies and request bodies before parsing them.
#[derive(Clone, Debug)]
pub enum TextMutation {
    DeleteByte(Index),
    FlipBit(Index, u8),
    Insert(Index, &'static str),
    /// Replaces one run of digits (with its minus sign) by another number.
    ReplaceNumber(Index, &'static str),
    Truncate(Index),
}

/// The text damage one fuzzer does: the tokens it inserts, the numbers it
/// puts in place of numbers (none: no `ReplaceNumber`), and whether tokens
/// ending in `,` (object keys) go right after an opening brace, to make
/// repeated keys, rather than anywhere.
pub struct TextDamage {
    pub tokens: &'static [&'static str],
    pub numbers: &'static [&'static str],
    pub keys_after_braces: bool,
}

impl TextDamage {
    pub fn mutation(&self) -> BoxedStrategy<TextMutation> {
        let tokens = self.tokens;
        if self.numbers.is_empty() {
            return prop_oneof![
                any::<Index>().prop_map(TextMutation::DeleteByte),
                (any::<Index>(), 0u8..8).prop_map(|(at, bit)| TextMutation::FlipBit(at, bit)),
                (any::<Index>(), select(tokens)).prop_map(|(at, token)| TextMutation::Insert(at, token)),
                any::<Index>().prop_map(TextMutation::Truncate),
            ]
            .boxed();
        }
        prop_oneof![
            any::<Index>().prop_map(TextMutation::DeleteByte),
            (any::<Index>(), 0u8..8).prop_map(|(at, bit)| TextMutation::FlipBit(at, bit)),
            (any::<Index>(), select(tokens)).prop_map(|(at, token)| TextMutation::Insert(at, token)),
            (any::<Index>(), select(self.numbers)).prop_map(|(at, number)| TextMutation::ReplaceNumber(at, number)),
            any::<Index>().prop_map(TextMutation::Truncate),
        ]
        .boxed()
    }

    pub fn apply(&self, bytes: &mut Vec<u8>, mutation: &TextMutation) {
        match mutation {
            TextMutation::DeleteByte(at) if !bytes.is_empty() => {
                bytes.remove(at.index(bytes.len()));
            }
            TextMutation::FlipBit(at, bit) if !bytes.is_empty() => {
                let at = at.index(bytes.len());
                bytes[at] ^= 1 << bit;
            }
            TextMutation::Insert(at, token) => {
                let braces: Vec<usize> = if self.keys_after_braces && token.ends_with(',') {
                    bytes.iter().enumerate().filter(|(_, byte)| **byte == b'{').map(|(i, _)| i + 1).collect()
                } else {
                    Vec::new()
                };
                let at = if braces.is_empty() { at.index(bytes.len() + 1) } else { braces[at.index(braces.len())] };
                bytes.splice(at..at, token.bytes());
            }
            TextMutation::ReplaceNumber(at, number) => {
                let runs = digit_runs(bytes);
                if !runs.is_empty() {
                    let (start, end) = runs[at.index(runs.len())];
                    bytes.splice(start..end, number.bytes());
                }
            }
            TextMutation::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
            TextMutation::DeleteByte(_) | TextMutation::FlipBit(..) => {}
        }
    }

    /// [`TextDamage::apply`] to a string, read back lossily as UTF-8.
    pub fn apply_to_text(&self, text: &str, mutation: &TextMutation) -> String {
        let mut bytes = text.as_bytes().to_vec();
        self.apply(&mut bytes, mutation);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// (start, end) of every run of ASCII digits, with the minus sign before it.
fn digit_runs(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index].is_ascii_digit() {
            let start = if index > 0 && bytes[index - 1] == b'-' { index - 1 } else { index };
            while index < bytes.len() && bytes[index].is_ascii_digit() {
                index += 1;
            }
            runs.push((start, index));
        } else {
            index += 1;
        }
    }
    runs
}

//! Integer amounts. Credits and money are never floats: every operation is
//! checked, and an overflow is an error the caller must handle, never a wrap.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A number of credits. Negative values appear only in signed views
/// (a balance with debt, a transaction's signed amount).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Credits(pub i64);

/// Money in integer minor units of some currency (cents for USD).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MinorUnits(pub i64);

/// Arithmetic overflowed. Inside a scheduled step this is a bug (the limits
/// make it impossible); inside a command it is a rejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("arithmetic overflow")]
pub struct Overflow;

macro_rules! checked_amount {
    ($name:ident) => {
        impl $name {
            pub const ZERO: $name = $name(0);

            pub fn checked_add(self, other: $name) -> Result<$name, Overflow> {
                self.0.checked_add(other.0).map($name).ok_or(Overflow)
            }

            pub fn checked_sub(self, other: $name) -> Result<$name, Overflow> {
                self.0.checked_sub(other.0).map($name).ok_or(Overflow)
            }

            pub fn is_zero(self) -> bool {
                self.0 == 0
            }

            pub fn is_positive(self) -> bool {
                self.0 > 0
            }

            /// Addition for values the limits bound far below `i64::MAX`
            /// (sums inside one member's state). An overflow here means an
            /// invariant is broken, and the process stops rather than write a
            /// wrong balance.
            pub fn plus(self, other: $name) -> $name {
                self.checked_add(other).expect(concat!(stringify!($name), " overflow: ledger invariant broken"))
            }

            /// Subtraction with the same contract as [`Self::plus`].
            pub fn minus(self, other: $name) -> $name {
                self.checked_sub(other).expect(concat!(stringify!($name), " overflow: ledger invariant broken"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl std::iter::Sum for $name {
            fn sum<I: Iterator<Item = $name>>(iter: I) -> $name {
                iter.fold($name::ZERO, |total, amount| total.plus(amount))
            }
        }
    };
}

checked_amount!(Credits);
checked_amount!(MinorUnits);

/// `amount × part / whole`, floored, computed in `i128` so that no
/// intermediate product overflows. Used for proration.
pub fn prorate(amount: i64, part: i64, whole: i64) -> i64 {
    assert!(whole > 0, "proration over an empty period");
    let part = part.clamp(0, whole);
    let value = (amount as i128 * part as i128).div_euclid(whole as i128);
    i64::try_from(value).expect("a prorated value never exceeds its amount")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_arithmetic_reports_overflow() {
        assert_eq!(Credits(i64::MAX).checked_add(Credits(1)), Err(Overflow));
        assert_eq!(Credits(i64::MIN).checked_sub(Credits(1)), Err(Overflow));
        assert_eq!(Credits(2).checked_add(Credits(3)), Ok(Credits(5)));
    }

    #[test]
    fn proration_floors_in_wide_integers() {
        assert_eq!(prorate(1_000, 1, 3), 333);
        assert_eq!(prorate(1_000_000_000_000, 2_678_399, 2_678_400), 999_999_626_642);
        assert_eq!(prorate(-1_000, 1, 3), -334);
        assert_eq!(prorate(100, 10, 10), 100);
        assert_eq!(prorate(100, 20, 10), 100);
    }
}

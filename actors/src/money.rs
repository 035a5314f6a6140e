//! Money as integers: 1 unit = 1e-9 USDT ("nano-USDT"). No float ever touches it.
//!
//! On the wire and in config, amounts are decimal strings in USDT with at most nine
//! fractional digits; anything finer is refused rather than rounded.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Nano-USDT per USDT.
pub const NANOS_PER_USDT: i64 = 1_000_000_000;
const FRACTION_DIGITS: usize = 9;

/// A signed amount of USDT, in nano-USDT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(pub i64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AmountError {
    #[error("amount is empty")]
    Empty,
    #[error("amount `{0}` is not a decimal number")]
    NotDecimal(String),
    #[error("amount `{0}` has more than nine fractional digits")]
    TooPrecise(String),
    #[error("amount `{0}` is out of range")]
    OutOfRange(String),
}

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub fn nanos(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).map(Amount)
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl FromStr for Amount {
    type Err = AmountError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        if s.is_empty() {
            return Err(AmountError::Empty);
        }
        let (negative, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (whole, fraction) = match digits.split_once('.') {
            Some((w, f)) => (w, f),
            None => (digits, ""),
        };
        let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction)
        {
            return Err(AmountError::NotDecimal(text.to_owned()));
        }
        if fraction.len() > FRACTION_DIGITS {
            return Err(AmountError::TooPrecise(text.to_owned()));
        }
        let out_of_range = || AmountError::OutOfRange(text.to_owned());
        let whole: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| out_of_range())?
        };
        let mut frac: i128 = 0;
        for (i, b) in fraction.bytes().enumerate() {
            frac += i128::from(b - b'0') * 10i128.pow((FRACTION_DIGITS - 1 - i) as u32);
        }
        // In i128, so that the most negative amount (whose magnitude exceeds i64::MAX) parses.
        let nanos = whole
            .checked_mul(i128::from(NANOS_PER_USDT))
            .and_then(|w| w.checked_add(frac))
            .ok_or_else(out_of_range)?;
        let signed = if negative { -nanos } else { nanos };
        i64::try_from(signed)
            .map(Amount)
            .map_err(|_| out_of_range())
    }
}

/// Room for the longest amount's text: a sign, ten whole digits, a point and nine more.
pub(crate) const TEXT_BYTES: usize = 24;

impl Amount {
    /// The shortest exact decimal (`1.5`, `0.00000015`, `-2`, `0`), written into `buf` from
    /// its end. Digit by digit rather than through `write!`: every charge is written three
    /// times into its journal line, and the formatting machinery cost about 900 instructions
    /// an amount (bench/callgrind.sh).
    pub(crate) fn decimal(self, buf: &mut [u8; TEXT_BYTES]) -> &str {
        let abs = self.0.unsigned_abs();
        let mut whole = abs / NANOS_PER_USDT as u64;
        let mut frac = abs % NANOS_PER_USDT as u64;
        let mut at = TEXT_BYTES;
        let mut put = |byte: u8| {
            at -= 1;
            buf[at] = byte;
        };
        if frac != 0 {
            // The fraction's nine digits less its trailing zeros.
            let mut width = FRACTION_DIGITS;
            while frac.is_multiple_of(10) {
                frac /= 10;
                width -= 1;
            }
            for _ in 0..width {
                put(b'0' + (frac % 10) as u8);
                frac /= 10;
            }
            put(b'.');
        }
        loop {
            put(b'0' + (whole % 10) as u8);
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        if self.0 < 0 {
            put(b'-');
        }
        // Only ASCII digits, a point and a sign were written.
        std::str::from_utf8(&buf[at..]).unwrap_or_default()
    }
}

impl fmt::Display for Amount {
    /// The shortest exact decimal: `1.5`, `0.00000015`, `-2`, `0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.decimal(&mut [0; TEXT_BYTES]))
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.decimal(&mut [0; TEXT_BYTES]))
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A model's price: nano-USDT per one million tokens, for input and for output.
/// Written in config as USDT per million tokens, e.g. `input_per_mtok = "0.15"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Price {
    pub input_per_mtok: u64,
    pub output_per_mtok: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PriceError {
    #[error(transparent)]
    Amount(#[from] AmountError),
    #[error("a price may not be negative")]
    Negative,
}

impl Price {
    pub fn parse(input_per_mtok: &str, output_per_mtok: &str) -> Result<Price, PriceError> {
        let one = |s: &str| -> Result<u64, PriceError> {
            let a: Amount = s.parse()?;
            u64::try_from(a.0).map_err(|_| PriceError::Negative)
        };
        Ok(Price {
            input_per_mtok: one(input_per_mtok)?,
            output_per_mtok: one(output_per_mtok)?,
        })
    }

    /// Cost of a call: ceil(input × input price + output × output price), in nano-USDT.
    /// Saturates at `i64::MAX`, far beyond any balance.
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> Amount {
        let micro = u128::from(input_tokens) * u128::from(self.input_per_mtok)
            + u128::from(output_tokens) * u128::from(self.output_per_mtok);
        let nanos = micro.div_ceil(1_000_000);
        Amount(i64::try_from(nanos).unwrap_or(i64::MAX))
    }

    /// The most output tokens `budget` pays for once `input_tokens` are paid for.
    /// `None` when the budget does not even cover the input.
    pub fn affordable_output(&self, budget: Amount, input_tokens: u64) -> Option<u64> {
        let budget = u128::try_from(budget.0).ok()?;
        let input_micro = u128::from(input_tokens) * u128::from(self.input_per_mtok);
        let budget_micro = budget * 1_000_000;
        let left = budget_micro.checked_sub(input_micro)?;
        if self.output_per_mtok == 0 {
            return Some(u64::MAX);
        }
        Some(u64::try_from(left / u128::from(self.output_per_mtok)).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests;

#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn parses_and_prints_exactly() {
    let cases = [
        ("1", 1_000_000_000, "1"),
        ("1.5", 1_500_000_000, "1.5"),
        ("0.000000001", 1, "0.000000001"),
        ("-2.25", -2_250_000_000, "-2.25"),
        ("0.15", 150_000_000, "0.15"),
        (".5", 500_000_000, "0.5"),
        ("10.", 10_000_000_000, "10"),
    ];
    for (text, nanos, printed) in cases {
        let a: Amount = text.parse().unwrap();
        assert_eq!(a, Amount(nanos), "{text}");
        assert_eq!(a.to_string(), printed, "{text}");
    }
}

#[test]
fn refuses_what_it_cannot_hold_exactly() {
    assert_eq!("".parse::<Amount>(), Err(AmountError::Empty));
    assert!(matches!(
        "1e3".parse::<Amount>(),
        Err(AmountError::NotDecimal(_))
    ));
    assert!(matches!(
        "1.2.3".parse::<Amount>(),
        Err(AmountError::NotDecimal(_))
    ));
    assert!(matches!(
        "0.0000000001".parse::<Amount>(),
        Err(AmountError::TooPrecise(_))
    ));
    assert!(matches!(
        "99999999999".parse::<Amount>(),
        Err(AmountError::OutOfRange(_))
    ));
    assert!(matches!(
        ".".parse::<Amount>(),
        Err(AmountError::NotDecimal(_))
    ));
}

#[test]
fn cost_rounds_up_to_the_nano() {
    // 0.15 USDT / Mtok in, 0.60 out.
    let p = Price::parse("0.15", "0.60").unwrap();
    assert_eq!(p.cost(1_000_000, 0), Amount(150_000_000));
    assert_eq!(p.cost(1, 0), Amount(150)); // 0.15e-6 USDT = 150 nano
    assert_eq!(p.cost(10, 7), Amount(1_500 + 4_200));
    // A price with a sub-nano per-token part rounds the total up once.
    let q = Price::parse("0.0375", "0").unwrap();
    assert_eq!(q.cost(1, 0), Amount(38)); // 37.5 -> 38
    assert_eq!(q.cost(2, 0), Amount(75));
}

#[test]
fn affordable_output_never_exceeds_budget() {
    let p = Price::parse("0.15", "0.60").unwrap();
    let budget = Amount(10_000);
    let out = p.affordable_output(budget, 10).unwrap();
    assert!(p.cost(10, out) <= budget);
    assert!(p.cost(10, out + 1) > budget);
    assert_eq!(p.affordable_output(Amount(100), 10), None);
}

#[test]
fn extremes_round_trip() {
    for v in [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX] {
        assert_eq!(
            Amount(v).to_string().parse::<Amount>(),
            Ok(Amount(v)),
            "{v}"
        );
        // JSON carries the same text, as a string.
        assert_eq!(
            serde_json::to_string(&Amount(v)).unwrap(),
            format!("\"{}\"", Amount(v))
        );
    }
    assert_eq!(Amount(i64::MIN).to_string(), "-9223372036.854775808");
    assert_eq!(Amount(i64::MAX).to_string(), "9223372036.854775807");
    assert_eq!(Amount(-10).to_string(), "-0.00000001");
    assert!(matches!(
        "9223372036.854775808".parse::<Amount>(),
        Err(AmountError::OutOfRange(_))
    ));
}

//! The RateLimit header values of draft-ietf-httpapi-ratelimit-headers-11,
//! as CheckLimit returns them and the Envoy door adds them to responses.
//!
//! Each value is one RFC 8941 list item: the rule's name as an sf-string,
//! then integer parameters, always these and in this order, so that callers
//! can compare the strings:
//!
//! - `RateLimit-Policy`: `"api";q=100;w=900`: `q` the tier's limit, `w` the
//!   window in seconds, rounded up (at least 1) when the window is not a
//!   whole number of seconds. It changes only on reload, so it is built with
//!   the policy ([`crate::rules::Rule::ratelimit_policy`]).
//! - `RateLimit`: `"api";r=42;t=30`: `r` the hits remaining, `t` the seconds
//!   until the window holds no hits, rounded up.
//!
//! Several items (one per Envoy descriptor) join with `", "` into one header
//! value ([`LIST_SEPARATOR`]).

use std::{fmt::Write as _, time::Duration};

/// Joins list items into one header value, as RFC 8941 serialises a list.
pub const LIST_SEPARATOR: &str = ", ";

/// The largest sf-integer (RFC 8941, 3.3.1: at most 15 digits). Larger
/// figures are written as this, so that a value always parses.
pub const MAX_INTEGER: u64 = 999_999_999_999_999;

/// The `RateLimit-Policy` item of a rule: `"<rule>";q=<limit>;w=<window>`.
pub fn policy_item(rule: &str, limit: u64, window: Duration) -> String {
    let mut item = sf_string(rule);
    // Writing to a String cannot fail.
    let _ = write!(
        item,
        ";q={};w={}",
        limit.min(MAX_INTEGER),
        window_seconds(window)
    );
    item
}

/// The `RateLimit` item of a rule: `"<rule>";r=<remaining>;t=<seconds>`.
pub fn ratelimit_item(rule: &str, remaining: u64, reset_after: Duration) -> String {
    let mut item = sf_string(rule);
    let _ = write!(
        item,
        ";r={};t={}",
        remaining.min(MAX_INTEGER),
        ceil_seconds(reset_after)
    );
    item
}

/// A window in whole seconds for `w`: rounded up, and at least 1, since a
/// window of 0 seconds would say the policy limits nothing.
pub fn window_seconds(window: Duration) -> u64 {
    ceil_seconds(window).max(1)
}

/// Whole seconds, rounded up, at most [`MAX_INTEGER`].
fn ceil_seconds(duration: Duration) -> u64 {
    let seconds = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    seconds.min(MAX_INTEGER)
}

/// `text` as an RFC 8941 sf-string. Rule names are plain (a-z, 0-9, `_`,
/// `-`), so escaping never happens for them; it is here so that the
/// function is right for any printable ASCII.
fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 24);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            // Not allowed in an sf-string; never in a valid rule name.
            c if !(' '..='~').contains(&c) => out.push('?'),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_written_as_the_draft_writes_them() {
        assert_eq!(
            policy_item("api", 100, Duration::from_secs(900)),
            r#""api";q=100;w=900"#
        );
        assert_eq!(
            ratelimit_item("api", 42, Duration::from_secs(30)),
            r#""api";r=42;t=30"#
        );
    }

    #[test]
    fn seconds_round_up_and_windows_are_at_least_one() {
        assert_eq!(window_seconds(Duration::from_millis(1)), 1);
        assert_eq!(window_seconds(Duration::from_millis(1_500)), 2);
        assert_eq!(window_seconds(Duration::from_secs(2)), 2);
        let t = |ms| ratelimit_item("a", 0, Duration::from_millis(ms));
        assert_eq!(t(0), r#""a";r=0;t=0"#);
        assert_eq!(t(1), r#""a";r=0;t=1"#);
        assert_eq!(t(1_001), r#""a";r=0;t=2"#);
    }

    #[test]
    fn figures_stay_within_sf_integers() {
        assert_eq!(
            policy_item("a", u64::MAX, Duration::MAX),
            format!(r#""a";q={MAX_INTEGER};w={MAX_INTEGER}"#)
        );
    }

    #[test]
    fn strings_escape_quotes_and_backslashes() {
        assert_eq!(sf_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(sf_string("é"), r#""?""#);
    }

    /// Reads an item back with a real RFC 8941 parser: (name, params).
    fn parsed(value: &str) -> (String, Vec<(String, i64)>) {
        use sfv::{List, ListEntry, Parser, Version};
        let list: List = Parser::new(value)
            .with_version(Version::Rfc8941)
            .parse()
            .unwrap_or_else(|err| panic!("{value:?}: {err}"));
        let [ListEntry::Item(item)] = list.as_slice() else {
            panic!("{value:?}: one item expected");
        };
        let name = item.bare_item.as_string().map(|s| s.as_str().to_owned());
        let params = item
            .params
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_integer().map(i64::from)))
            .map(|(k, v)| (k, v.unwrap_or_else(|| panic!("{value:?}: an integer"))))
            .collect();
        (
            name.unwrap_or_else(|| panic!("{value:?}: a string")),
            params,
        )
    }

    proptest::proptest! {
        #[test]
        fn every_item_parses_back_to_its_figures(
            limit: u64,
            remaining: u64,
            window_ms in 1..u64::MAX / 1_000_000,
            reset_ns: u64,
            name in "[a-z0-9_-]{1,64}",
        ) {
            let window = Duration::from_millis(window_ms);
            let reset = Duration::from_nanos(reset_ns);
            let whole = |d: Duration| {
                let up = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                i64::try_from(up.min(MAX_INTEGER)).unwrap_or(i64::MAX)
            };
            let figure = |n: u64| i64::try_from(n.min(MAX_INTEGER)).unwrap_or(i64::MAX);
            let policy = parsed(&policy_item(&name, limit, window));
            proptest::prop_assert_eq!(
                policy,
                (name.clone(), vec![("q".to_owned(), figure(limit)), ("w".to_owned(), whole(window).max(1))])
            );
            let ratelimit = parsed(&ratelimit_item(&name, remaining, reset));
            proptest::prop_assert_eq!(
                ratelimit,
                (name, vec![("r".to_owned(), figure(remaining)), ("t".to_owned(), whole(reset))])
            );
        }
    }
}

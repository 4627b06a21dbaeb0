//! RateLimit header values (draft-ietf-httpapi-ratelimit-headers-11) read
//! back with a real RFC 8941 parser (`sfv`), so that tests check what an
//! HTTP client would parse, not the strings tollgate meant to write.

// Several test binaries include this module and each uses a part of it.
#![allow(dead_code)]

use sfv::{List, ListEntry, Parser, Version};

/// One list item: the policy name and its parameters, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderItem {
    /// The item: an sf-string naming the rule.
    pub(crate) name: String,
    /// Every parameter, in the order written, with its integer value.
    pub(crate) params: Vec<(String, i64)>,
}

/// Parses a header value as an RFC 8941 list of items whose items are
/// sf-strings with integer parameters; panics on anything else.
pub(crate) fn parse(value: &str) -> Vec<HeaderItem> {
    let list: List = Parser::new(value)
        .with_version(Version::Rfc8941)
        .parse()
        .unwrap_or_else(|err| panic!("{value:?} is not an RFC 8941 list: {err}"));
    list.into_iter()
        .map(|entry| {
            let ListEntry::Item(item) = entry else {
                panic!("{value:?}: an inner list where an item belongs");
            };
            let name = item
                .bare_item
                .as_string()
                .unwrap_or_else(|| panic!("{value:?}: the item is not an sf-string"))
                .as_str()
                .to_owned();
            let params = item
                .params
                .iter()
                .map(|(key, bare)| {
                    let integer = bare
                        .as_integer()
                        .unwrap_or_else(|| panic!("{value:?}: {key:?} is not an integer"));
                    (key.as_str().to_owned(), i64::from(integer))
                })
                .collect();
            HeaderItem { name, params }
        })
        .collect()
}

/// The one `RateLimit-Policy` item `value` holds: (name, q, w), after
/// checking that q and w are its only parameters, in this order.
pub(crate) fn policy(value: &str) -> (String, i64, i64) {
    let [item] = <[HeaderItem; 1]>::try_from(parse(value))
        .unwrap_or_else(|items| panic!("{value:?}: one item expected, got {items:?}"));
    policy_of(&item)
}

/// (name, q, w) of a `RateLimit-Policy` item.
pub(crate) fn policy_of(item: &HeaderItem) -> (String, i64, i64) {
    let keys: Vec<&str> = item.params.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["q", "w"], "{item:?}");
    (item.name.clone(), item.params[0].1, item.params[1].1)
}

/// The one `RateLimit` item `value` holds: (name, r, t), after checking
/// that r and t are its only parameters, in this order.
pub(crate) fn ratelimit(value: &str) -> (String, i64, i64) {
    let [item] = <[HeaderItem; 1]>::try_from(parse(value))
        .unwrap_or_else(|items| panic!("{value:?}: one item expected, got {items:?}"));
    ratelimit_of(&item)
}

/// (name, r, t) of a `RateLimit` item.
pub(crate) fn ratelimit_of(item: &HeaderItem) -> (String, i64, i64) {
    let keys: Vec<&str> = item.params.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["r", "t"], "{item:?}");
    (item.name.clone(), item.params[0].1, item.params[1].1)
}

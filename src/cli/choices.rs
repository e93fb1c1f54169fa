//! clap value parsers built from the library's lists of names: a library
//! enum (`BackendKind`, `Schedule`, `Order`, `Target`, ...) lists its values
//! once (`ALL`, `name`, `FromStr`, `Display`), and the CLI parses and shows
//! `[possible values: ...]` from that list rather than mirroring the enum.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

/// A parser that accepts the names of `values` (by `name`) and lists them in
/// `--help`, each with its line from `about` where that is not empty.
pub fn one_of<T>(
    values: &'static [T],
    name: fn(T) -> &'static str,
    about: fn(T) -> &'static str,
) -> impl TypedValueParser<Value = T>
where
    T: Copy + Send + Sync + 'static,
{
    let possible = values.iter().map(move |&value| {
        let possible = PossibleValue::new(name(value));
        match about(value) {
            "" => possible,
            line => possible.help(line),
        }
    });
    PossibleValuesParser::new(possible).map(move |given: String| {
        values
            .iter()
            .copied()
            .find(|&value| name(value) == given)
            .expect("clap accepts only the listed names")
    })
}

/// For [`one_of`]'s `about` where the values need no explanation.
pub fn no_about<T>(_: T) -> &'static str {
    ""
}

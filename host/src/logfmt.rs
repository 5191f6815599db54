//! How weir writes log fields in its text format: every value, the message
//! included, with control characters escaped and cut to a bound. Strings
//! from plugins and clients (pool names, reject reasons, server names,
//! plugin log lines) reach the log through many fields; escaping them here,
//! where every field passes, means no value can forge a line (a `\n`
//! followed by a fake `INFO ... connection` record) or flood the log.
//! The JSON format escapes by construction.

use std::fmt;

use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::fmt::format::Writer;

/// Longest a field's value is written, in bytes; the rest is dropped and
/// its length said.
pub const MAX_FIELD_BYTES: usize = 4096;

/// The field formatter for `tracing_subscriber::fmt().fmt_fields(..)`:
/// `message` bare, then `name=value` separated by spaces (as tracing's own
/// text format), each value escaped by [`escape`].
pub fn fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    tracing_subscriber::fmt::format::debug_fn(
        |writer: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn fmt::Debug| {
            let text = format!("{value:?}");
            if field.name() != "message" {
                write!(writer, "{}=", field.name())?;
            }
            escape(writer, &text, MAX_FIELD_BYTES)
        },
    )
    .delimited(" ")
}

/// Writes `text` with every control character escaped (`\n`, `\r`, `\t`,
/// others as `\u{..}`), cut after `max` bytes with the number of bytes left
/// out.
pub fn escape(out: &mut impl fmt::Write, text: &str, max: usize) -> fmt::Result {
    let mut written = 0;
    for (at, c) in text.char_indices() {
        if written >= max {
            return write!(out, "...[{} more bytes]", text.len() - at);
        }
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if c.is_control() => write!(out, "\\u{{{:x}}}", u32::from(c))?,
            c => out.write_char(c)?,
        }
        written += c.len_utf8();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(text: &str, max: usize) -> String {
        let mut out = String::new();
        escape(&mut out, text, max).expect("a String");
        out
    }

    #[test]
    fn control_characters_cannot_start_a_line() {
        let forged = "pool\n2026-12-01T00:00:00Z  INFO weir::gateway: connection id=1\r\u{1b}[2J\u{7f}";
        let out = escaped(forged, MAX_FIELD_BYTES);
        assert!(!out.chars().any(char::is_control), "{out}");
        assert_eq!(
            out,
            "pool\\n2026-12-01T00:00:00Z  INFO weir::gateway: connection id=1\\r\\u{1b}[2J\\u{7f}"
        );
    }

    #[test]
    fn long_values_are_cut_and_say_so() {
        let long = "é".repeat(3000);
        let out = escaped(&long, MAX_FIELD_BYTES);
        assert!(out.len() < MAX_FIELD_BYTES + 40, "{}", out.len());
        assert!(out.ends_with("...[1904 more bytes]"), "{}", &out[out.len() - 30..]);
        assert_eq!(escaped("short", 10), "short");
    }
}

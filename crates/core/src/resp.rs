//! RESP2, the Redis serialization protocol: a decoder of server replies over bytes and an
//! encoder of values and commands.
//!
//! The decoder is total: any byte string yields a value, "need more bytes", or a typed
//! error, never a panic. It is bounded by [`Limits`]: nested arrays deeper than
//! `max_depth`, bulk strings longer than `max_bulk`, arrays with more than `max_elements`
//! elements, lines longer than `max_line` and replies larger than `max_reply` bytes are
//! refused as soon as their header is read, before their bytes are awaited or allocated.
//!
//! ```text
//! +OK\r\n                 simple string      -ERR why\r\n     error
//! :42\r\n                 integer            $3\r\nfoo\r\n    bulk string ($-1: null)
//! *2\r\n:1\r\n$-1\r\n     array (*-1: null)
//! ```
//! Lines end in CRLF; simple strings and errors hold neither CR nor LF.

use crate::CoreError;

/// One RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+text`: a status reply (`OK`, `PONG`).
    Simple(Vec<u8>),
    /// `-text`: an error reply (`ERR ...`, `WRONGPASS ...`).
    Error(Vec<u8>),
    /// `:n`.
    Integer(i64),
    /// `$n` and `n` bytes; `None` is the null bulk string `$-1` (a missing key).
    Bulk(Option<Vec<u8>>),
    /// `*n` and `n` values; `None` is the null array `*-1`.
    Array(Option<Vec<Value>>),
}

impl Value {
    /// A short description for error messages: the kind, and the size of bulks and arrays
    /// (never their contents, which may be large or secret).
    pub fn describe(&self) -> String {
        match self {
            Self::Simple(_) => "a simple string".into(),
            Self::Error(_) => "an error".into(),
            Self::Integer(n) => format!("the integer {n}"),
            Self::Bulk(None) => "a null bulk string".into(),
            Self::Bulk(Some(b)) => format!("a bulk string of {} bytes", b.len()),
            Self::Array(None) => "a null array".into(),
            Self::Array(Some(v)) => format!("an array of {} values", v.len()),
        }
    }

    /// Appends the encoding of this value to `out`. Fails, leaving `out` as it was, when a
    /// simple string or an error holds CR or LF (RESP cannot carry them there).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), CoreError> {
        let start = out.len();
        let r = self.encode_into(out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), CoreError> {
        match self {
            Self::Simple(s) | Self::Error(s) => {
                if s.iter().any(|&b| b == b'\r' || b == b'\n') {
                    return Err(CoreError::Resp {
                        offset: out.len(),
                        reason: "a simple string or error cannot hold CR or LF",
                    });
                }
                out.push(if matches!(self, Self::Simple(_)) { b'+' } else { b'-' });
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            Self::Integer(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Self::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Self::Bulk(Some(b)) => push_bulk(out, b),
            Self::Array(None) => out.extend_from_slice(b"*-1\r\n"),
            Self::Array(Some(items)) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for v in items {
                    v.encode_into(out)?;
                }
            }
        }
        Ok(())
    }
}

fn push_bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// A command as clients send it: an array of bulk strings (`SET key value`).
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        push_bulk(&mut out, a);
    }
    out
}

/// Bounds on what one reply may contain; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Arrays nested inside arrays: a top-level array has depth 1.
    pub max_depth: usize,
    /// Bytes of one bulk string.
    pub max_bulk: usize,
    /// Values in one array.
    pub max_elements: usize,
    /// Bytes of one line (a simple string, error, integer or length header), CRLF included.
    pub max_line: usize,
    /// Bytes of one whole reply.
    pub max_reply: usize,
}

impl Default for Limits {
    /// Generous for metadata replies (descriptors are at most 16 MiB), small enough that a
    /// hostile server cannot make a client allocate without bound or recurse deeply.
    fn default() -> Self {
        Self {
            max_depth: 16,
            max_bulk: 64 << 20,
            max_elements: 1 << 20,
            max_line: 64 << 10,
            max_reply: 128 << 20,
        }
    }
}

/// Decodes one reply from the start of `buf`.
///
/// Returns `Ok(Some((value, used)))` when `buf[..used]` holds a whole reply, `Ok(None)` when
/// `buf` is a valid but incomplete prefix (read more and call again with the longer buffer),
/// and an error when `buf` can never become a valid reply within `limits` (the stream is
/// out of step: drop the connection).
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(Value, usize)>, CoreError> {
    let mut d = Decoder { buf, pos: 0, limits };
    match d.value(0)? {
        Some(v) => Ok(Some((v, d.pos))),
        None if buf.len() >= limits.max_reply => Err(CoreError::RespLimit {
            offset: 0,
            what: "reply bytes",
            found: buf.len() as u64,
            limit: limits.max_reply as u64,
        }),
        None => Ok(None),
    }
}

/// `Ok(None)`: more bytes are needed.
type Step<T> = Result<Option<T>, CoreError>;

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: &'a Limits,
}

impl<'a> Decoder<'a> {
    fn malformed(&self, at: usize, reason: &'static str) -> CoreError {
        CoreError::Resp { offset: at, reason }
    }

    fn over(&self, at: usize, what: &'static str, found: u64, limit: usize) -> CoreError {
        CoreError::RespLimit { offset: at, what, found, limit: limit as u64 }
    }

    /// The next value; `depth` arrays enclose it.
    fn value(&mut self, depth: usize) -> Step<Value> {
        let start = self.pos;
        let Some(line) = self.line()? else { return Ok(None) };
        let Some((&kind, rest)) = line.split_first() else {
            return Err(self.malformed(start, "empty line where a reply type byte belongs"));
        };
        Ok(Some(match kind {
            b'+' => Value::Simple(rest.to_vec()),
            b'-' => Value::Error(rest.to_vec()),
            b':' => Value::Integer(self.integer(start + 1, rest)?),
            b'$' => {
                let Some(len) = self.length(start, rest, "bulk bytes", self.limits.max_bulk)?
                else {
                    return Ok(Some(Value::Bulk(None)));
                };
                let body = self.pos;
                let end = body.checked_add(len).and_then(|e| e.checked_add(2));
                let Some(end) = end.filter(|&e| e <= self.limits.max_reply) else {
                    return Err(self.over(
                        start,
                        "reply bytes",
                        (body as u64).saturating_add(len as u64 + 2),
                        self.limits.max_reply,
                    ));
                };
                let Some(chunk) = self.buf.get(body..end) else { return Ok(None) };
                let (data, crlf) = chunk.split_at(len);
                if crlf != b"\r\n" {
                    return Err(self.malformed(body + len, "bulk string not followed by CRLF"));
                }
                self.pos = end;
                Value::Bulk(Some(data.to_vec()))
            }
            b'*' => {
                let Some(n) =
                    self.length(start, rest, "array elements", self.limits.max_elements)?
                else {
                    return Ok(Some(Value::Array(None)));
                };
                if depth >= self.limits.max_depth {
                    return Err(self.over(
                        start,
                        "array nesting",
                        depth as u64 + 1,
                        self.limits.max_depth,
                    ));
                }
                // Each value takes at least 3 bytes ("+\r\n"): never reserve more than the
                // buffer could hold, whatever the header claims.
                let room = self.buf.len().saturating_sub(self.pos) / 3;
                let mut items = Vec::with_capacity(n.min(room));
                for _ in 0..n {
                    let Some(v) = self.value(depth + 1)? else { return Ok(None) };
                    items.push(v);
                }
                Value::Array(Some(items))
            }
            _ => return Err(self.malformed(start, "unknown reply type byte")),
        }))
    }

    /// The bytes of the next line without its CRLF; advances past the CRLF.
    fn line(&mut self) -> Step<&'a [u8]> {
        let buf: &'a [u8] = self.buf;
        let rest = buf.get(self.pos..).unwrap_or_default();
        let window = &rest[..rest.len().min(self.limits.max_line)];
        let Some(lf) = window.iter().position(|&b| b == b'\n') else {
            if window.len() >= self.limits.max_line {
                return Err(self.over(
                    self.pos,
                    "line bytes",
                    window.len() as u64,
                    self.limits.max_line,
                ));
            }
            return Ok(None);
        };
        let Some(cr) = lf.checked_sub(1).filter(|&cr| window[cr] == b'\r') else {
            return Err(self.malformed(self.pos + lf, "line ends in LF without CR"));
        };
        let line = &window[..cr];
        if let Some(i) = line.iter().position(|&b| b == b'\r') {
            return Err(self.malformed(self.pos + i, "CR inside a line"));
        }
        let end = self.pos + lf + 1;
        if end > self.limits.max_reply {
            return Err(self.over(self.pos, "reply bytes", end as u64, self.limits.max_reply));
        }
        self.pos = end;
        Ok(Some(line))
    }

    /// A decimal i64: an optional `-`, then 1 to 19 digits.
    fn integer(&self, at: usize, text: &[u8]) -> Result<i64, CoreError> {
        let (negative, digits) = match text.split_first() {
            Some((b'-', d)) => (true, d),
            _ => (false, text),
        };
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(self.malformed(at, "not a decimal integer"));
        }
        // 19 digits fit in a u64; the sign is applied in i128 so that i64::MIN parses.
        let magnitude = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        let value = if negative { -i128::from(magnitude) } else { i128::from(magnitude) };
        i64::try_from(value).map_err(|_| self.malformed(at, "integer out of range"))
    }

    /// The length in a `$` or `*` header: `None` for -1 (null), at most `limit`.
    fn length(
        &self,
        at: usize,
        text: &[u8],
        what: &'static str,
        limit: usize,
    ) -> Result<Option<usize>, CoreError> {
        match self.integer(at + 1, text)? {
            -1 => Ok(None),
            n if n < 0 => Err(self.malformed(at + 1, "negative length other than -1")),
            n => match usize::try_from(n).ok().filter(|&n| n <= limit) {
                Some(n) => Ok(Some(n)),
                None => Err(self.over(at, what, n as u64, limit)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn whole(bytes: &[u8]) -> Result<Option<(Value, usize)>, CoreError> {
        decode(bytes, &Limits::default())
    }

    fn one(bytes: &[u8]) -> Value {
        match whole(bytes) {
            Ok(Some((v, used))) if used == bytes.len() => v,
            other => panic!("{bytes:?}: {other:?}"),
        }
    }

    fn bulk(b: &[u8]) -> Value {
        Value::Bulk(Some(b.to_vec()))
    }

    #[test]
    fn decodes_every_kind() {
        assert_eq!(one(b"+OK\r\n"), Value::Simple(b"OK".to_vec()));
        assert_eq!(one(b"-ERR no\r\n"), Value::Error(b"ERR no".to_vec()));
        assert_eq!(one(b":-42\r\n"), Value::Integer(-42));
        assert_eq!(one(b":9223372036854775807\r\n"), Value::Integer(i64::MAX));
        assert_eq!(one(b":-9223372036854775808\r\n"), Value::Integer(i64::MIN));
        assert_eq!(one(b"$-1\r\n"), Value::Bulk(None));
        assert_eq!(one(b"$0\r\n\r\n"), bulk(b""));
        assert_eq!(one(b"$4\r\na\r\nb\r\n"), bulk(b"a\r\nb"));
        assert_eq!(one(b"*-1\r\n"), Value::Array(None));
        assert_eq!(
            one(b"*3\r\n:1\r\n*1\r\n$1\r\nx\r\n+\r\n"),
            Value::Array(Some(vec![
                Value::Integer(1),
                Value::Array(Some(vec![bulk(b"x")])),
                Value::Simple(Vec::new()),
            ]))
        );
        // Non-UTF-8 and multi-byte characters are bytes like any other.
        assert_eq!(one("+é\r\n".as_bytes()), Value::Simple("é".as_bytes().to_vec()));
        assert_eq!(one(b"-\xff\xfe\r\n"), Value::Error(vec![0xff, 0xfe]));
    }

    #[test]
    fn a_reply_followed_by_more_uses_only_its_bytes() {
        assert_eq!(whole(b":1\r\n:2\r\n"), Ok(Some((Value::Integer(1), 4))));
    }

    #[test]
    fn every_prefix_of_a_reply_asks_for_more() {
        let full = b"*2\r\n$5\r\nhello\r\n*1\r\n:7\r\n";
        for n in 0..full.len() {
            assert_eq!(whole(&full[..n]), Ok(None), "prefix of {n} bytes");
        }
        assert!(matches!(whole(full), Ok(Some((_, n))) if n == full.len()));
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        let bad: [&[u8]; 16] = [
            "é\r\n".as_bytes(), // a multi-byte first character: the old parser's panic
            b"\r\n",
            b"?x\r\n",
            b":\r\n",
            b":12a\r\n",
            b":+1\r\n",
            b":99999999999999999999\r\n",
            b":9223372036854775808\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            b"$x\r\n",
            b"*-5\r\n",
            b"+OK\n",
            b"+O\rK\r\n",
            b"*1\r\n?\r\n",
            b"*2\r\n:1\r\n$1\r\nab\r\n",
        ];
        for b in bad {
            assert!(
                matches!(whole(b), Err(CoreError::Resp { .. })),
                "{:?}: {:?}",
                String::from_utf8_lossy(b),
                whole(b)
            );
        }
    }

    #[test]
    fn limits_refuse_before_the_bytes_arrive() {
        let tight =
            Limits { max_depth: 2, max_bulk: 8, max_elements: 3, max_line: 16, max_reply: 40 };
        let over = |b: &[u8], what: &str| match decode(b, &tight) {
            Err(CoreError::RespLimit { what: w, .. }) => assert_eq!(w, what, "{b:?}"),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(b)),
        };
        over(b"$9\r\n", "bulk bytes");
        over(b"*4\r\n", "array elements");
        over(b"*1\r\n*1\r\n*1\r\n", "array nesting");
        over(b"+0123456789abcdef", "line bytes");
        over(b"*3\r\n$8\r\n01234567\r\n$8\r\n01234567\r\n$8\r\n01234567\r\n", "reply bytes");
        assert_eq!(decode(b"$8\r\n", &tight), Ok(None));
        assert!(matches!(decode(b"*1\r\n*1\r\n:1\r\n", &tight), Ok(Some(_))));
        // A deep nest within the default limit decodes; a million levels do not recurse.
        let deep = |n: usize| [b"*1\r\n".repeat(n), b":1\r\n".to_vec()].concat();
        assert!(matches!(whole(&deep(16)), Ok(Some(_))));
        assert!(matches!(whole(&deep(1_000_000)), Err(CoreError::RespLimit { .. })));
        // A huge claimed array with no elements yet reserves nothing and asks for more.
        assert_eq!(whole(b"*1048576\r\n"), Ok(None));
    }

    #[test]
    fn commands_are_arrays_of_bulks() {
        let c = encode_command(&[b"SET", b"k", b"v\r\n"]);
        assert_eq!(c, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n");
        assert_eq!(one(&c), Value::Array(Some(vec![bulk(b"SET"), bulk(b"k"), bulk(b"v\r\n")])));
    }

    #[test]
    fn simple_strings_with_line_breaks_do_not_encode() {
        let mut out = b"kept".to_vec();
        assert!(Value::Array(Some(vec![Value::Integer(1), Value::Simple(b"a\nb".to_vec())]))
            .encode(&mut out)
            .is_err());
        assert_eq!(out, b"kept");
    }

    fn line_text() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
            0..12,
        )
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            line_text().prop_map(Value::Simple),
            line_text().prop_map(Value::Error),
            any::<i64>().prop_map(Value::Integer),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24))
                .prop_map(Value::Bulk),
        ];
        leaf.prop_recursive(6, 48, 6, |inner| {
            proptest::option::of(proptest::collection::vec(inner, 0..6)).prop_map(Value::Array)
        })
    }

    proptest! {
        #[test]
        fn encoded_values_round_trip(v in value(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = Vec::new();
            v.encode(&mut bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let n = bytes.len();
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(whole(&bytes), Ok(Some((v, n))));
            for cut in 0..n {
                prop_assert_eq!(whole(&bytes[..cut]), Ok(None));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let tight =
                Limits { max_depth: 3, max_bulk: 16, max_elements: 4, max_line: 32, max_reply: 128 };
            for limits in [Limits::default(), tight] {
                if let Ok(Some((v, used))) = decode(&bytes, &limits) {
                    prop_assert!(used <= bytes.len());
                    let mut again = Vec::new();
                    v.encode(&mut again).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(decode(&again, &Limits::default()), Ok(Some((v, again.len()))));
                }
            }
        }

        #[test]
        fn replies_made_of_resp_tokens_never_panic(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(&b"*"[..]), Just(&b"$"[..]), Just(&b":"[..]), Just(&b"+"[..]),
                    Just(&b"-"[..]), Just(&b"\r\n"[..]), Just(&b"-1"[..]), Just(&b"1"[..]),
                    Just(&b"3"[..]), Just(&b"\r"[..]), Just(&b"\n"[..]), Just("é".as_bytes()),
                ],
                0..40,
            )
        ) {
            let bytes = parts.concat();
            if let Ok(Some((v, used))) = whole(&bytes) {
                prop_assert!(used <= bytes.len());
                let mut again = Vec::new();
                v.encode(&mut again).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(whole(&again), Ok(Some((v, again.len()))));
            }
        }
    }
}

//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the trace id
//! a request carries in `traceparent`, and fresh ones. The module's
//! `$afr_trace_id` and the sidecar's spans agree through these.

/// The 32 lowercase hex digits of the trace id in `traceparent`
/// (`00-<trace id>-<parent id>-<flags>`), when the header is valid: version
/// not `ff`, ids of the right length in lowercase hex and not all zeros.
pub fn trace_id(traceparent: &[u8]) -> Option<&[u8]> {
    let v = traceparent.trim_ascii();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let zero = |s: &[u8]| s.iter().all(|&b| b == b'0');
    // Version 00 has exactly four fields; a later version may append more.
    if v.len() < 55 || (v.len() > 55 && (v[55] != b'-' || v.starts_with(b"00"))) {
        return None;
    }
    let (version, trace, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    let dashes = v[2] == b'-' && v[35] == b'-' && v[52] == b'-';
    let valid = dashes
        && hex(version)
        && version != b"ff"
        && hex(trace)
        && !zero(trace)
        && hex(parent)
        && !zero(parent)
        && hex(flags);
    valid.then_some(trace)
}

/// `id` as 32 lowercase hex digits, a trace id's text.
pub fn hex128(id: u128) -> [u8; 32] {
    let mut out = [b'0'; 32];
    hex_into(&id.to_be_bytes(), &mut out);
    out
}

/// The `traceparent` (version 00) of a span: its trace id, its own id and
/// its flags (`01`: sampled). Written digit by digit: through `format!`
/// (the ids' `LowerHex`) it cost the sidecar ~2 600 instructions an attempt.
pub fn traceparent(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> String {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&trace_id, &mut out[3..35]);
    hex_into(&span_id, &mut out[36..52]);
    hex_into(&[flags], &mut out[53..55]);
    // Only ASCII hex digits and dashes are in it.
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `bytes` as lowercase hex into `out` (twice their length).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_traceparents_give_their_trace_id() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some(&b"4bf92f3577b34da6a3ce929d0e0e4736"[..]));
        assert_eq!(
            trace_id(b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ").map(<[u8]>::len),
            Some(32)
        );
        // A later version may carry more fields.
        assert!(
            trace_id(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some()
        );
    }

    #[test]
    fn invalid_traceparents_give_none() {
        for bad in [
            &b""[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert_eq!(trace_id(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn traceparent_is_version_00() {
        let trace = 0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes();
        let span = 0x00f067aa0ba902b7u64.to_be_bytes();
        let tp = traceparent(trace, span, 1);
        assert_eq!(
            tp,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            trace_id(tp.as_bytes()),
            Some(&b"4bf92f3577b34da6a3ce929d0e0e4736"[..])
        );
    }

    #[test]
    fn hex_is_32_lowercase_digits() {
        assert_eq!(
            &hex128(0x4bf92f3577b34da6a3ce929d0e0e4736),
            b"4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(&hex128(1), b"00000000000000000000000000000001");
    }
}

//! The SSE framer on arbitrary bytes cut at arbitrary points: never a panic;
//! the events and what is left pending are the input byte for byte, however
//! it was cut.
#![no_main]
use afr_core::sse::EventFramer;
use libfuzzer_sys::fuzz_target;

fn frame(pieces: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>, bool) {
    let mut framer = EventFramer::with_max_event(4096);
    let mut events = Vec::new();
    for piece in pieces {
        framer.push(piece);
        loop {
            match framer.next_event() {
                Ok(Some(event)) => events.push(event),
                Ok(None) => break,
                Err(_) => return (events, Vec::new(), true),
            }
        }
    }
    (events, framer.pending().to_vec(), false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut % 16) + 1;
    let pieces: Vec<&[u8]> = body.chunks(step).collect();
    let (events, pending, failed) = frame(&pieces);
    let (whole_events, whole_pending, whole_failed) = frame(&[body]);
    if failed || whole_failed {
        return;
    }
    assert_eq!(events, whole_events, "cut every {step} bytes");
    assert_eq!(pending, whole_pending);
    let mut joined: Vec<u8> = events.concat();
    joined.extend_from_slice(&pending);
    assert_eq!(joined, body);
});

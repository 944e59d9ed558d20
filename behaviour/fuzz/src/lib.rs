//! Checks shared by the fuzz targets: a length-prefixed codec
//! ([`LengthCodec`] over a [`Wire`]) fed arbitrary bytes, as a peer's
//! stream would feed it.
//!
//! For each frame it decodes: the Encoder writes exactly the bytes the
//! decode consumed (the wire format is canonical), those bytes decode back
//! to an equal frame, and every strict prefix of them is `Ok(None)` with the
//! buffer untouched. Whatever does not decode is an error, never a panic.

use asynchronous_codec::{Decoder as _, Encoder as _};
use bytes::BytesMut;
use meshwhisper_behaviour::stream::{LengthCodec, Wire};

/// Decodes `data` with a `LengthCodec::<W>` of limit `max` until it returns
/// `Ok(None)` or an error, checking every frame with [`check_frame`] and
/// that `Ok(None)` leaves the buffer as it was. Returns how many frames
/// decoded.
pub fn check_stream<W: Wire>(max: usize, data: &[u8]) -> usize
where
    W::Frame: Clone + PartialEq,
{
    let mut codec = LengthCodec::<W>::new(max);
    let mut buf = BytesMut::from(data);
    let mut frames = 0;
    loop {
        let before = buf.clone();
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                assert!(
                    buf.len() < before.len(),
                    "{frame:?} decoded without consuming anything"
                );
                let used = before.len() - buf.len();
                assert_eq!(
                    &buf[..],
                    &before[used..],
                    "decode changed bytes it did not consume"
                );
                check_frame::<W>(max, frame, &before[..used]);
                frames += 1;
            }
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) changed the buffer");
                return frames;
            }
            // The stream closes on an error: nothing after it is read.
            Err(_) => return frames,
        }
    }
}

/// Checks one decoded `frame` against the bytes `wire` it was decoded
/// from (length prefix included), with a codec of limit `max`.
pub fn check_frame<W: Wire>(max: usize, frame: W::Frame, wire: &[u8])
where
    W::Frame: Clone + PartialEq,
{
    // (a) Canonical: re-encoding gives the same bytes, which decode to an
    // equal frame and nothing else.
    let mut out = BytesMut::new();
    if let Err(e) = LengthCodec::<W>::new(max).encode(frame.clone(), &mut out) {
        panic!("{frame:?} decoded from {wire:02x?} does not re-encode: {e}");
    }
    assert_eq!(
        &out[..],
        wire,
        "not canonical: {frame:?} re-encodes to other bytes than it was decoded from"
    );
    let mut again = out;
    match LengthCodec::<W>::new(max).decode(&mut again) {
        Ok(Some(back)) => assert!(back == frame, "{frame:?} decodes back as {back:?}"),
        other => panic!("{frame:?} re-encoded does not decode: {other:?}"),
    }
    assert!(again.is_empty(), "re-encoded {frame:?} left bytes over");

    // (b) A partial frame consumes nothing: feed the bytes one at a time,
    // as a slow stream would, into one buffer (which the decoder may
    // `reserve` in); every strict prefix is Ok(None) and stays as it was.
    let mut codec = LengthCodec::<W>::new(max);
    let mut partial = BytesMut::new();
    for (n, byte) in wire.iter().enumerate() {
        match codec.decode(&mut partial) {
            Ok(None) => {}
            other => panic!(
                "{n}-byte prefix of a {}-byte frame ({frame:?}): {other:?}",
                wire.len()
            ),
        }
        assert_eq!(
            &partial[..],
            &wire[..n],
            "Ok(None) changed a {n}-byte prefix"
        );
        partial.extend_from_slice(&[*byte]);
    }
    match codec.decode(&mut partial) {
        Ok(Some(back)) => assert!(
            back == frame,
            "{frame:?} fed byte by byte decodes as {back:?}"
        ),
        other => panic!("{frame:?} fed byte by byte: {other:?}"),
    }
    assert!(partial.is_empty(), "{frame:?} fed byte by byte left bytes over");
}

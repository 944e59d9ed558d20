#![no_main]
//! The shared `u32 BE length ‖ type ‖ body` framing with a frame limit taken
//! from the input's first 3 bytes (0 to 16 MiB - 1) over the rest of the
//! input: `split_frame` takes exactly the frame its prefix announces, or
//! says "not yet" without touching the buffer, or refuses the prefix (over
//! the limit, or empty) for the reason the prefix gives; and
//! `LengthCodec` with that limit, over a pass-through wire and over the
//! federation and device wires, keeps the checks of `check_stream`
//! (canonical re-encoding, prefixes consume nothing, errors not panics).
use bytes::{BufMut as _, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use meshwhisper_behaviour::device::codec::DeviceWire;
use meshwhisper_behaviour::federation::codec::FederationWire;
use meshwhisper_behaviour::stream::{FrameError, LengthError, Wire, split_frame};
use meshwhisper_behaviour_fuzz::check_stream;

/// A wire whose frames are the raw type byte and body: the framing alone.
struct RawWire;

impl Wire for RawWire {
    type Frame = (u8, Bytes);
    const PROTOCOL: &'static str = "/meshwhisper-fuzz/raw";

    fn body_len(frame: &(u8, Bytes)) -> usize {
        1 + frame.1.len()
    }

    fn check(_: &(u8, Bytes)) -> Result<(), FrameError> {
        Ok(())
    }

    fn write((kind, body): (u8, Bytes), dst: &mut BytesMut) {
        dst.put_u8(kind);
        dst.put_slice(&body);
    }

    fn read(kind: u8, body: Bytes) -> Result<(u8, Bytes), FrameError> {
        Ok((kind, body))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let max = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    split_frames(max, rest);
    check_stream::<RawWire>(max, rest);
    check_stream::<FederationWire>(max, rest);
    check_stream::<DeviceWire>(max, rest);
});

/// `split_frame` over `data` until "not yet" or an error, each outcome
/// checked against the length prefix it saw.
fn split_frames(max: usize, data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        let announced = before
            .first_chunk::<4>()
            .map(|p| u32::from_be_bytes(*p) as usize);
        match split_frame(&mut buf, max) {
            Ok(Some((kind, body))) => {
                let len = announced.expect("a frame without a length prefix");
                assert!((1..=max).contains(&len), "took a {len}-byte frame, limit {max}");
                assert_eq!(1 + body.len(), len, "the body is not the announced length");
                let used = 4 + len;
                assert!(before.len() >= used, "took a frame that had not all arrived");
                assert_eq!(buf.len(), before.len() - used, "did not take exactly one frame");
                assert_eq!(kind, before[4]);
                assert_eq!(&body[..], &before[5..used]);
                assert_eq!(&buf[..], &before[used..], "changed bytes after the frame");
            }
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) changed the buffer");
                if let Some(len) = announced {
                    assert!((1..=max).contains(&len), "waits for a {len}-byte frame, limit {max}");
                    assert!(before.len() < 4 + len, "waits though the frame has arrived");
                }
                return;
            }
            Err(LengthError::TooLarge { got, max: limit }) => {
                assert_eq!(Some(got), announced);
                assert_eq!(limit, max);
                assert!(got > max, "refused a {got}-byte frame under the limit {max}");
                return;
            }
            Err(LengthError::Empty) => {
                assert_eq!(announced, Some(0));
                return;
            }
        }
    }
}
